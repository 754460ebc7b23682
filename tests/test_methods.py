"""Published ways to cut a small model out of a big one (ShortGPT, Wanda-sp, FLAP, Minitron), each a strategy
of the registry: each test recomputes the method's own score from the parent's raw activations, caught with
plain hooks (no project code), and checks that the child keeps exactly what that score ranks first."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from subclone_core.core.archs import arch_of_model
from subclone_core.core.errors import SubcloneError
from subclone_core.core.shape import Shape
from subclone_core.core.strategies import STRATEGY_SPECS, needs_input_stats, plan_shape, subclone_model
from subclone_core.pipeline.calibration import calibrate
from tests import tiny_models as tm
from tests.cli_runner import REFIT_IN, run_cli

pytestmark = pytest.mark.usefixtures("one_thread")
FAMILIES = ("llama", "gpt2", "gpt_neox", "olmo2", "phi3", "smollm3", "vit")


def batches(model) -> list[dict[str, Tensor]]:
    """Two calibration batches; the first left-padded, so that padding must be left out of every statistic."""
    return [tm.inputs(model, seed=1, pad=2), tm.inputs(model, seed=2)]


def captured(model, batch_list, paths: list[str]) -> dict[str, list[tuple[Tensor, Tensor, Tensor | None]]]:
    """path -> per batch (module input, module output, real-token mask): plain hooks, activations kept whole."""
    seen = {path: [] for path in paths}
    mask: list[Tensor | None] = [None]

    def hook(path):
        def keep(module, args, kwargs, output):
            x = args[0] if args else kwargs["hidden_states"]
            seen[path].append((x.detach(), (output[0] if isinstance(output, tuple) else output).detach(), mask[0]))
        return keep
    handles = [model.get_submodule(p).register_forward_hook(hook(p), with_kwargs=True) for p in paths]
    try:
        with torch.no_grad():
            for batch in batch_list:
                mask[0] = batch.get("attention_mask", None)
                mask[0] = None if mask[0] is None else mask[0].bool()
                model(**batch)
    finally:
        for h in handles:
            h.remove()
    return seen


def real_rows(x: Tensor, mask: Tensor | None) -> Tensor:
    """(N, C) the real tokens' rows."""
    return x.reshape(-1, x.shape[-1]) if mask is None else x[mask]


def weight_out_in(module: nn.Module) -> Tensor:
    """A linear layer's weight as (out, in) (GPT-2's Conv1D stores (in, out))."""
    return module.weight.T if isinstance(module, Conv1D) else module.weight


def influence(model, batch_list) -> Tensor:
    """(L,) ShortGPT's block influence: 1 - cos(block input, block output), averaged over real tokens."""
    arch = arch_of_model(model)
    paths = [f"{arch.blocks}.{i}" for i in range(len(model.get_submodule(arch.blocks)))]
    seen = captured(model, batch_list, paths)
    scores = []
    for path in paths:
        cos = torch.cat([nn.functional.cosine_similarity(real_rows(x, m), real_rows(y, m), dim=-1)
                         for x, y, m in seen[path]])
        scores.append((1 - cos).mean())
    return torch.stack(scores)


def lowest(scores: Tensor, n: int) -> list[int]:
    return sorted(torch.argsort(scores)[:n].tolist())


def top(scores: Tensor, n: int) -> set[int]:
    return set(torch.argsort(scores, descending=True)[:n].tolist())


def half_width(parent, shape: Shape) -> Shape:
    """Half the FFN and the heads (and the KV heads where there are fewer than heads)."""
    return plan_shape(parent, ffn=shape.ffn // 2, heads=shape.heads // 2,
                      kv_heads=max(1, shape.kv_heads // 2) if shape.kv_heads < shape.heads else None)


def assert_keeps_top_heads(sel, j: int, heads: Tensor, shape: Shape, target: Shape) -> None:
    """Child block j keeps the top heads by ``heads`` (the parent block's head scores): overall with one head per
    KV group, else the top heads within each kept KV group."""
    if shape.kv_heads == shape.heads:
        assert set(sel.heads[j]) == top(heads, target.heads)
        return
    ratio, keep = shape.queries_per_kv, target.queries_per_kv
    for g in sel.kv_heads[j]:
        assert {h for h in sel.heads[j] if h // ratio == g} == {g * ratio + h for h in
                                                               top(heads[g * ratio:(g + 1) * ratio], keep)}


# ---------------------------------------------------------------- ShortGPT


@pytest.mark.parametrize("family", FAMILIES)
def test_shortgpt_removes_exactly_the_blocks_of_lowest_influence(family):
    parent = tm.make(family)
    shape = Shape.of(parent.config)
    importance = calibrate(parent, batches(parent), input_stats=True)
    expected = lowest(influence(parent, batches(parent)), shape.layers - 1)
    child = subclone_model(parent, plan_shape(parent, layers=1), strategy="shortgpt", importance=importance)
    assert child.manifest.removed_blocks == expected  # any block may go, the first and last included
    assert child.manifest.drop == "influence" and child.manifest.refit is False
    assert Shape.of(child.model.config).as_dict() == {**shape.as_dict(), "layers": 1}


def test_block_influence_is_not_relative_magnitude():
    """On this parent the two block rankings disagree on the lowest block: ShortGPT's and Minitron's children
    drop the block of lowest 1 - cos, not the one of lowest ||f(x)|| / ||x + f(x)||."""
    parent = tm.make("smollm3")
    importance = calibrate(parent, batches(parent), input_stats=True)
    by_influence = lowest(influence(parent, batches(parent)), 1)
    assert by_influence != lowest(importance.rel_magnitude, 1)  # the case that tells them apart
    for strategy in ("shortgpt", "minitron"):
        child = subclone_model(parent, plan_shape(parent, layers=3), strategy=strategy, importance=importance)
        assert child.manifest.removed_blocks == by_influence


def test_shortgpt_child_is_the_parent_without_those_blocks():
    parent = tm.make("llama")
    importance = calibrate(parent, batches(parent), input_stats=True)
    child = subclone_model(parent, plan_shape(parent, layers=2), strategy="shortgpt", importance=importance)
    kept = child.manifest.kept_blocks
    layers = parent.model.layers
    parent.model.layers = nn.ModuleList([layers[i] for i in kept])  # the parent, those blocks skipped
    try:
        batch = tm.inputs(parent)
        assert torch.equal(tm.output(child.model, batch), tm.output(parent, batch))
    finally:
        parent.model.layers = layers


def test_shortgpt_refuses_width_cuts():
    parent = tm.make("llama")
    importance = calibrate(parent, batches(parent), input_stats=True)
    with pytest.raises(SubcloneError, match="removes blocks only"):
        subclone_model(parent, plan_shape(parent, layers=2, ffn=24), strategy="shortgpt", importance=importance)


# ---------------------------------------------------------------- Wanda-sp


def wanda_sp(model, batch_list, path: str, block: int, head_dim: int | None = None) -> Tensor:
    """FLAP's prune_wanda_sp score of the input channels of one output projection: sum over rows of
    |W_ij| x ||x_j|| (L2 over the real tokens); per head, summed over the head's channels."""
    arch = arch_of_model(model)
    full = f"{arch.blocks}.{block}.{path}"
    x = torch.cat([real_rows(x, m) for x, _, m in captured(model, batch_list, [full])[full]])  # (N, C)
    score = (weight_out_in(model.get_submodule(full)).abs() * x.norm(dim=0)).sum(0)
    return score if head_dim is None else score.view(-1, head_dim).sum(-1)


@pytest.mark.parametrize("family", FAMILIES)
def test_wanda_sp_keeps_the_top_neurons_and_heads_of_its_score(family):
    parent = tm.make(family)
    arch, shape = arch_of_model(parent), Shape.of(parent.config)
    importance = calibrate(parent, batches(parent), input_stats=True)
    target = half_width(parent, shape)
    child = subclone_model(parent, target, strategy="wanda-sp", importance=importance)
    sel = child.selection
    for j, b in enumerate(sel.blocks):
        ffn = wanda_sp(parent, batches(parent), arch.ffn_down, b)
        assert set(sel.ffn[j]) == top(ffn, target.ffn)
        heads = wanda_sp(parent, batches(parent), arch.attn_out, b, shape.head_dim)
        assert_keeps_top_heads(sel, j, heads, shape, target)
    # the residual stream: Wanda-sp does not cut it; our default ranking of the family
    assert child.manifest.residual_score == arch.residual_score and child.manifest.refit is False


# ---------------------------------------------------------------- Minitron


def seq_l2(seen_batches) -> Tensor:
    """ModelOpt's activation importance of each channel: mean |x| over each sequence's real tokens, then the L2
    norm over all sequences."""
    per_seq = []
    for x, _, m in seen_batches:
        m = torch.ones(x.shape[:2], dtype=torch.bool) if m is None else m
        per_seq += [x[i][m[i]].abs().mean(0) for i in range(x.shape[0])]
    return torch.stack(per_seq).norm(dim=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_minitron_keeps_the_top_of_its_activation_importance(family):
    parent = tm.make(family)
    arch, shape = arch_of_model(parent), Shape.of(parent.config)
    importance = calibrate(parent, batches(parent), input_stats=True)
    target = plan_shape(parent, layers=shape.layers - 1, hidden=shape.hidden // 2, ffn=shape.ffn // 2,
                        heads=shape.heads // 2)
    child = subclone_model(parent, target, strategy="minitron", importance=importance)
    sel = child.selection
    assert sel.removed_blocks(shape.layers) == lowest(influence(parent, batches(parent)), 1)
    blocks = [f"{arch.blocks}.{b}" for b in range(shape.layers)]
    # the hidden size: one score per (block, sublayer) of its normed input (the input of q and of gate / up / fc1)
    readers = [f"{blk}.{p}" for blk in blocks for p in
               {p.rpartition(".")[0]: p for p in reversed(arch.residual_readers[1])}.values()]
    ffn_in, attn_in = [f"{blk}.{arch.ffn_down}" for blk in blocks], [f"{blk}.{arch.attn_out}" for blk in blocks]
    seen = captured(parent, batches(parent), readers + ffn_in + attn_in)
    hidden = sum(seq_l2(seen[r]) for r in readers)
    assert sel.residual == torch.argsort(hidden, descending=True)[:target.hidden].tolist()
    for j, b in enumerate(sel.blocks):
        assert set(sel.ffn[j]) == top(seq_l2(seen[ffn_in[b]]), target.ffn)
        heads = seq_l2(seen[attn_in[b]]).view(shape.heads, shape.head_dim).norm(dim=-1)
        if shape.kv_heads == shape.heads:
            assert set(sel.heads[j]) == top(heads, target.heads)
    assert child.manifest.refit is False and child.manifest.scale is False  # slice only


def test_minitron_refuses_the_refit():
    parent = tm.make("llama")
    importance = calibrate(parent, batches(parent), input_stats=True)
    with pytest.raises(SubcloneError, match="own weight rule"):
        subclone_model(parent, plan_shape(parent, ffn=24), strategy="minitron", importance=importance, refit=True)


def test_the_methods_are_registered_strategies():
    for name in ("shortgpt", "wanda-sp", "flap", "minitron", "slicegpt"):
        assert STRATEGY_SPECS[name].builds_as is None


# ---------------------------------------------------------------- FLAP


def flap_score(x: Tensor, w: Tensor, head_dim: int | None = None) -> Tensor:
    """FLAP's WIFV metric of an output projection's input channels: the variance of each over the real tokens x
    the squared norm of the weight column that reads it; per head (its uniform-per-layer structure) the sum of the
    squared metric over the head's channels."""
    metric = x.var(dim=0, unbiased=False) * w.square().sum(0)
    return metric if head_dim is None else metric.square().view(-1, head_dim).sum(-1)


FLAP_FAMILIES = ("llama", "gpt2", "gpt_neox", "smollm3", "vit")


@pytest.mark.parametrize("family", FLAP_FAMILIES)
def test_flap_keeps_the_top_of_its_fluctuation_and_compensates_in_the_bias(family):
    parent = tm.make(family)
    arch, shape = arch_of_model(parent), Shape.of(parent.config)
    importance = calibrate(parent, batches(parent), input_stats=True)
    target = half_width(parent, shape)
    child = subclone_model(parent, target, strategy="flap", importance=importance)
    sel, blocks = child.selection, arch.blocks
    paths = [f"{blocks}.{b}.{p}" for b in range(shape.layers) for p in (arch.ffn_down, arch.attn_out)]
    seen = captured(parent, batches(parent), paths)
    for j, b in enumerate(sel.blocks):
        for path, kept in ((arch.ffn_down, sel.ffn[j]), (arch.attn_out, sel.heads[j])):
            full = f"{blocks}.{b}.{path}"
            x = torch.cat([real_rows(x, m) for x, _, m in seen[full]])  # (N, C)
            w = weight_out_in(parent.get_submodule(full))  # (D, C)
            is_heads = path == arch.attn_out
            score = flap_score(x, w, shape.head_dim if is_heads else None)
            if not is_heads or shape.kv_heads == shape.heads:
                assert set(kept) == top(score, len(kept))
            channels = torch.cat([torch.arange(h * shape.head_dim, (h + 1) * shape.head_dim) for h in kept]) \
                if is_heads else torch.tensor(kept)
            removed = torch.ones(x.shape[1], dtype=torch.bool)
            removed[channels] = False
            bias = getattr(parent.get_submodule(full), "bias", None)
            expected = x[:, removed].mean(0) @ w[:, removed].T + (0 if bias is None else bias)
            got = child.model.get_submodule(f"{blocks}.{j}.{path}").bias
            torch.testing.assert_close(got, expected[sel.residual], rtol=1e-12, atol=1e-12)


def test_flap_child_matches_the_parents_mean_ffn_output_in_the_first_block():
    """Only FFN neurons go: the first block's down projection reads the parent's very inputs on the kept neurons,
    so with the compensation its output, averaged over the calibration tokens, is the parent's exactly."""
    parent = tm.make("llama")
    importance = calibrate(parent, batches(parent), input_stats=True)
    child = subclone_model(parent, plan_shape(parent, ffn=20), strategy="flap", importance=importance)
    assert child.model.config.mlp_bias is True and child.model.config.attention_bias is False
    path = "model.layers.0.mlp.down_proj"
    means = []
    for model in (parent, child.model):
        outs = captured(model, batches(parent), [path])[path]
        means.append(torch.cat([real_rows(y, m) for _, y, m in outs]).mean(0))
    # Llama's RMSNorm computes in float32, where the child's reordered residual stream rounds differently
    scale = means[0].abs().max()
    torch.testing.assert_close(means[1], means[0][child.selection.residual], rtol=0, atol=1e-6 * scale)
    uncompensated = means[1] - child.model.model.layers[0].mlp.down_proj.bias
    assert (uncompensated - means[0][child.selection.residual]).abs().max() > 1e-3 * scale  # it would differ
    assert torch.equal(child.model.model.layers[0].mlp.up_proj.bias, torch.zeros(20, dtype=torch.float64))


@pytest.mark.parametrize(("family", "size", "why"), [("phi3", "ffn", "Phi-3"), ("phi3", "heads", "Phi-3"),
                                                     ("mistral", "ffn", "mistral"), ("qwen3", "ffn", "qwen3"),
                                                     ("qwen2", "heads", "qwen2")])
def test_flap_refuses_a_projection_that_can_have_no_bias(family, size, why):
    parent = tm.make(family)
    shape = Shape.of(parent.config)
    importance = calibrate(parent, batches(parent), input_stats=True)
    sizes = {"ffn": shape.ffn // 2} if size == "ffn" else {"heads": shape.heads // 2,
                                                             "kv_heads": shape.kv_heads // 2 or None}
    with pytest.raises(SubcloneError, match=f"no config switch.*--{size}") as err:
        subclone_model(parent, plan_shape(parent, **sizes), strategy="flap", importance=importance)
    assert why in str(err.value)


def test_flap_ranks_heads_by_the_squared_metric():
    """FLAP scores a head by the sum of its channels' squared metric, not the plain sum; on this parent (8 heads,
    one per KV group, seed chosen so) the two keep different heads in block 0."""
    torch.manual_seed(0)
    parent = tm.llama(heads=8, kv_heads=8, layers=2).double().eval()
    importance = calibrate(parent, batches(parent), input_stats=True)
    child = subclone_model(parent, plan_shape(parent, heads=4), strategy="flap", importance=importance)
    path = "model.layers.0.self_attn.o_proj"
    x = torch.cat([real_rows(x, m) for x, _, m in captured(parent, batches(parent), [path])[path]])
    metric = flap_score(x, parent.get_submodule(path).weight)
    assert top(metric.view(8, 8).sum(-1), 4) != top(metric.square().view(8, 8).sum(-1), 4)  # tells them apart
    assert set(child.selection.heads[0]) == top(flap_score(x, parent.get_submodule(path).weight, 8), 4)


# ---------------------------------------------------------------- the command line


@pytest.mark.parametrize(("strategy", "shape", "method"), [
    ("shortgpt", ["--layers", 2], "shortgpt, drop influence, widths kept, no scaling"),
    ("wanda-sp", ["--layers", 3, "--hidden", 32, "--ffn", 24], ("wanda-sp, drop magnitude, read ranking, slice only, "
                                                                "no refit, no scaling")),
    ("flap", ["--ffn", 24, "--heads", 4, "--kv-heads", 1], ("flap, drop magnitude, read ranking, bias compensation, "
                                                            "no refit, no scaling")),
    ("minitron", ["--layers", 3, "--hidden", 32, "--ffn", 24], ("minitron, drop influence, minitron ranking, "
                                                                "slice only, no refit, no scaling")),
    ("llm-pruner", ["--layers", 3, "--ffn", 24, "--heads", 4, "--kv-heads", 1],
     "llm-pruner, drop magnitude, read ranking, slice only, no refit, no scaling"),
])
def test_make_builds_each_method_and_its_plan_line_names_it(strategy, shape, method, llama_dir, counting_text_file,
                                                            tmp_path):
    from transformers import AutoModelForCausalLM

    from subclone_core.io.saving import read_manifest

    out_dir = tmp_path / "child"
    code, out, err = run_cli(["make", "--parent", llama_dir, "--out", out_dir, *shape, "--strategy", strategy,
                              "--data", counting_text_file, "--calib-tokens", 256])
    assert code == 0, err
    assert out.splitlines()[0].startswith(f"plan: {method} | "), out
    assert "Warning" not in err  # nothing a user of the method would expect is off
    manifest = read_manifest(out_dir)
    assert manifest.strategy == strategy and manifest.plan["line"] == out.splitlines()[0]
    # a plain folder, FLAP's new biases included (written through the streamed child's sink)
    child, info = AutoModelForCausalLM.from_pretrained(out_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert child.config.num_hidden_layers == manifest.child_shape["layers"]
    if strategy == "flap":
        assert child.config.attention_bias and child.config.mlp_bias
        for layer in child.model.layers:  # the compensation in o and down, zeros where the switches added biases
            assert layer.mlp.down_proj.bias.abs().max() > 0 and layer.self_attn.o_proj.bias.abs().max() > 0
            assert not layer.mlp.up_proj.bias.any() and not layer.self_attn.q_proj.bias.any()


def test_compare_takes_the_methods_and_says_each_plan(llama_dir, counting_text_file):
    """--refit applies to the candidates that can take it; the methods with their own weight rule are built by
    that rule beside them (asking a run for the refit is not an error for them)."""
    names = ["subclone", "shortgpt", "wanda-sp", "flap", "minitron"]
    code, out, err = run_cli(["compare", "--parent", llama_dir, "--layers", 2, "--data", counting_text_file,
                              "--calib-tokens", 256, "--strategies", ",".join(names), "--refit", "--steps", 1,
                              "--eval-every", 1, "--batch-size", 2, "--seq-len", 16, "--eval-tokens", 32, "--quiet"])
    assert code == 0, err
    lines = out.splitlines()[:5]
    assert [line.split(",")[0].split(" ")[1] for line in lines] == names
    assert f"refit on child inputs, block by block{REFIT_IN}," in lines[0]
    assert "slice only, no refit" in lines[2] and "bias compensation, no refit" in lines[3]


def test_refit_asked_of_a_method_with_its_own_weight_rule_is_an_error(llama_dir, counting_text_file, tmp_path):
    code, out, err = run_cli(["make", "--parent", llama_dir, "--out", tmp_path / "c", "--ffn", 24, "--strategy",
                              "minitron", "--refit", "--data", counting_text_file, "--calib-tokens", 256])
    assert code == 2 and out == "" and "own weight rule" in err and not (tmp_path / "c").exists()


def test_calibration_without_input_statistics_has_none_and_the_methods_say_so():
    assert not needs_input_stats("subclone") and needs_input_stats("flap") and needs_input_stats("minitron")
    parent = tm.make("llama")
    with_stats = calibrate(parent, batches(parent), input_stats=True)
    without = calibrate(parent, batches(parent))  # the default: only what the paper's strategies read
    assert without.input_stats == {} and set(with_stats.input_stats) >= {"ffn_sq", "ffn_mean", "read_seq"}
    for name in ("heads", "ffn", "rel_magnitude", "one_minus_cos"):  # the paper's scores are the same either way
        assert torch.equal(getattr(without, name), getattr(with_stats, name))
    with pytest.raises(SubcloneError, match="calibrate again with them"):
        subclone_model(parent, plan_shape(parent, ffn=24), strategy="wanda-sp", importance=without)


def test_a_saved_importance_keeps_the_input_statistics(tmp_path):
    parent = tm.make("gpt2")
    importance = calibrate(parent, batches(parent), input_stats=True)
    assert "input_stats" not in importance.to_json()  # reports (inspect) stay the size they were
    importance.save(tmp_path / "importance.json")
    again = type(importance).load(tmp_path / "importance.json")
    target = plan_shape(parent, ffn=64, heads=2)
    for strategy in ("wanda-sp", "flap", "minitron"):
        a = subclone_model(parent, target, strategy=strategy, importance=importance).selection
        b = subclone_model(parent, target, strategy=strategy, importance=again).selection
        assert a == b


# ---------------------------------------------------------------- LLM-Pruner


def labelled(model) -> list[dict[str, Tensor]]:
    """The calibration batches with labels (the padding ignored), as the data sets give them."""
    return [{**b, "labels": b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)} for b in batches(model)]


def gradients(model, batch_list) -> None:
    """Plain autograd: d(sum over batches of the mean loss x the batch's real tokens)/dW into every .grad."""
    model.zero_grad()
    for batch in batch_list:
        (model(**batch).loss * batch["attention_mask"].sum()).backward()


LLAMA_LAYOUT = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def taylor_llama_layout(block: nn.Module, shape: Shape) -> tuple[Tensor, Tensor]:
    """LLM-Pruner's param_first scores of one block: per head, |W * grad| summed over its q rows, its KV head's k
    and v rows and its o columns; per FFN neuron, over its gate and up rows and its down column."""
    sal = {p: (m.weight * m.weight.grad).abs() for p in LLAMA_LAYOUT if (m := block.get_submodule(p)) is not None}
    q, k, v, o, gate, up, down = (sal[p] for p in LLAMA_LAYOUT)
    group = shape.heads // shape.kv_heads
    per_kv = (k.sum(1) + v.sum(1)).view(shape.kv_heads, shape.head_dim).sum(-1)
    heads = (q.sum(1) + o.sum(0)).view(shape.heads, shape.head_dim).sum(-1) + per_kv.repeat_interleave(group)
    return heads, gate.sum(1) + up.sum(1) + down.sum(0)


def taylor_gpt2(block: nn.Module, shape: Shape) -> tuple[Tensor, Tensor]:
    """The same for GPT-2's fused, transposed (Conv1D: (in, out)) layers: c_attn's columns [q | k | v]."""
    sal = {p: (m.weight * m.weight.grad).abs() for p in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
           for m in [block.get_submodule(p)]}
    qkv = sal["attn.c_attn"].sum(0).view(3, shape.heads, shape.head_dim).sum((0, 2))
    heads = qkv + sal["attn.c_proj"].sum(1).view(shape.heads, shape.head_dim).sum(-1)
    return heads, sal["mlp.c_fc"].sum(0) + sal["mlp.c_proj"].sum(1)


TAYLOR_FAMILIES = {"llama": taylor_llama_layout, "olmo2": taylor_llama_layout, "smollm3": taylor_llama_layout,
                   "gpt2": taylor_gpt2}


@pytest.mark.parametrize("family", TAYLOR_FAMILIES)
def test_llm_pruner_keeps_the_top_of_its_first_order_taylor_importance(family):
    from subclone_core.pipeline.calibration import taylor_scores

    parent = tm.make(family)
    arch, shape = arch_of_model(parent), Shape.of(parent.config)
    importance = calibrate(parent, batches(parent))
    importance.input_stats.update(taylor_scores(parent, labelled(parent)))
    assert all(p.grad is None for p in parent.parameters())  # the parent is left as it was
    gradients(parent, labelled(parent))
    blocks = parent.get_submodule(arch.blocks)
    target = half_width(parent, shape)
    child = subclone_model(parent, target, strategy="llm-pruner", importance=importance)
    sel = child.selection
    for j, b in enumerate(sel.blocks):
        heads, ffn = TAYLOR_FAMILIES[family](blocks[b], shape)
        assert set(sel.ffn[j]) == top(ffn, target.ffn)
        assert_keeps_top_heads(sel, j, heads, shape, target)
    assert child.manifest.refit is False and child.manifest.scale is False  # slice only
    full = subclone_model(parent, Shape.of(parent.config), strategy="llm-pruner", importance=importance)
    batch = tm.inputs(parent)
    # RMSNorm computes in float32 even in a float64 model: the project's tolerance for "the same" (test_core_exactness)
    torch.testing.assert_close(tm.output(full.model, batch), tm.output(parent, batch), atol=1e-5, rtol=0)


def test_llm_pruner_needs_the_taylor_scores_and_a_parent_in_memory(tiny_llama_dir, counting_text_file):
    from subclone_core.core.strategies import needs_taylor
    from subclone_core.sources import load_parent
    from subclone_core.workflow.children import has_statistics, measure_importance, recorded_statistics

    assert needs_taylor("llm-pruner") and not needs_input_stats("llm-pruner") and not needs_taylor("wanda-sp")
    assert recorded_statistics(["llm-pruner"]) == {"input_stats": False, "residual_cov": False, "taylor": True}
    parent = tm.make("llama")
    with pytest.raises(SubcloneError, match="calibrate again with them"):
        subclone_model(parent, plan_shape(parent, ffn=24), strategy="llm-pruner", importance=calibrate(
            parent, batches(parent)))
    loaded = load_parent(str(tiny_llama_dir))
    measured = measure_importance(loaded, str(counting_text_file), tokens=256, taylor=True)
    assert has_statistics(measured, ["llm-pruner"]) and measured.input_stats["ffn_taylor"].abs().sum() > 0
    with pytest.raises(SubcloneError, match="gradients of the whole parent"):
        measure_importance(loaded, str(counting_text_file), tokens=256, taylor=True, sequential=True)


# ---------------------------------------------------------------- GRAIL


def test_grail_is_our_selection_refit_by_its_ridge_towards_zero_on_the_parents_inputs(monkeypatch):
    """GRAIL's compensation: W' = W G[:, k] (G[k, k] + lam I)^-1, lam = 1e-3 x the mean kept diagonal, on the
    parent's inputs: the child equals subclone's selection refit by exactly that rule (the family's table
    swapped for it), and differs from our default refit towards the slice."""
    import dataclasses

    from subclone_core.core import archs
    from subclone_core.core.strategies import refit_table
    from tests.test_core_refit import calibration, items_of

    parent = tm.make("llama", dtype=torch.float64)
    imp = calibration(parent)
    target = plan_shape(parent, hidden=24, heads=2, ffn=40)
    grail = subclone_model(parent, target, strategy="grail", importance=imp, refit_items=items_of(parent))
    assert grail.manifest.refit is True and grail.manifest.scale is False
    table = refit_table(arch_of_model(parent), "grail")
    assert (table.refit_toward, table.refit_ridge, table.refit_inputs) == ("zero", 1e-3, "parent")
    mt = parent.config.model_type
    monkeypatch.setitem(archs.REGISTRY, mt, dataclasses.replace(archs.REGISTRY[mt], refit_toward="zero",
                                                                 refit_ridge=1e-3, refit_inputs="parent"))
    want = subclone_model(parent, target, importance=imp, scale=False, refit=True, refit_items=items_of(parent))
    monkeypatch.undo()
    ours = subclone_model(parent, target, importance=imp, scale=False, refit=True, refit_items=items_of(parent))
    got, same, other = (m.model.state_dict() for m in (grail, want, ours))
    assert got.keys() == same.keys()
    for name in got:
        torch.testing.assert_close(got[name], same[name], rtol=0, atol=0)
    down = "model.layers.0.mlp.down_proj.weight"
    assert not torch.allclose(got[down], other[down])


def test_grail_plan_line_names_its_rule(llama_dir, counting_text_file, tmp_path):
    code, out, err = run_cli(["make", "--parent", llama_dir, "--out", tmp_path / "c", "--ffn", 24, "--strategy",
                              "grail", "--data", counting_text_file, "--calib-tokens", 256])
    assert code == 0, err
    assert ("grail, drop magnitude, read ranking, refit on parent inputs with a ridge towards zero, block by block"
            in out.splitlines()[0])
