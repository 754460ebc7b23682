"""Files and devices: atomic writes, output claims, model folders, streaming, GGUF export, placement."""
