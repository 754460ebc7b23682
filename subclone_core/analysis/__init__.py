"""What a parent or child looks like inside: probes (generation, block ablation), the inspector, shape exploration."""
