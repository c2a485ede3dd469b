"""Every bf16 model the project makes keeps its buffers, the rotary inverse frequencies, in fp32.

Why: the rotary angle of position p is p · inv_freq. In bf16 (8 mantissa bits) inv_freq is off by up to
2^-9 of itself, so at position 1000 the angle is off by up to ~2 rad; transformers keeps these buffers in fp32
for that reason, and a bf16 cast of the whole module undoes it (method.md §17).

BF16_MODELS lists every path that makes a bf16 model. Each entry is a context manager that yields the model
as its forwards see it (FSDP: inside full_params, where the gathered bf16 parameters are in place). A new way
of making a bf16 model (offload, pure bf16, adapters) gets an entry here.
"""
from contextlib import contextmanager

import pytest
import torch
import torch.distributed as dist

import eval as eval_script
import train
from timerpo.distributed import SINGLE, Dist, full_params, prepare_policy
from timerpo.policy import load_policy, save_policy
from timerpo.precision import setup_precision

BF16 = torch.bfloat16


@pytest.fixture(scope="module")
def saved_tiny(tiny_policy, tmp_path_factory):
    """The tiny model as a model folder (fp32 weights), loaded the way a checkpoint or hub model is."""
    folder = str(tmp_path_factory.mktemp("bf16") / "model")
    save_policy(tiny_policy, folder)
    return folder


def bf16_config():
    return train.parse_args(["--dtype", "bf16", "--device", "cpu"])


@contextmanager
def gloo_group(store: str, offload: bool = False):
    """A one-rank gloo process group in this process, torn down on the way out."""
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    try:
        yield Dist(mode="fsdp", world_size=1, offload=offload)
    finally:
        dist.destroy_process_group()


@contextmanager
def loaded(folder, tmp_path):
    yield load_policy(folder, dtype=BF16).model


@contextmanager
def loaded_tiny(folder, tmp_path):
    yield load_policy("tiny", dtype=BF16).model


@contextmanager
def eval_loaded(folder, tmp_path):
    args = eval_script.parse_args(["--model", folder, "--data", str(tmp_path), "--dtype", "bf16", "--device", "cpu"])
    yield eval_script.load_model(args).model


@contextmanager
def sampling_copy(folder, tmp_path):
    policy = load_policy(folder)
    setup_precision(policy, BF16)  # fp32 masters, bf16 copy for rollouts
    yield policy.sampler


@contextmanager
def kl_reference(folder, tmp_path):
    yield train.make_reference(load_policy(folder), folder, bf16_config(), SINGLE).model


@contextmanager
def fsdp_gathered(folder, tmp_path):
    with gloo_group(str(tmp_path / "store")) as d:
        policy = load_policy(folder)
        prepare_policy(policy, d, dtype=BF16)  # MixedPrecisionPolicy(param_dtype=bf16) over fp32 shards
        with full_params(policy, d):
            yield policy.model


@contextmanager
def offload_gathered(folder, tmp_path):
    with gloo_group(str(tmp_path / "store"), offload=True) as d:
        policy = load_policy(folder)
        prepare_policy(policy, d, grad_checkpointing=True, dtype=BF16)  # --offload: shards in host memory
        with full_params(policy, d):
            yield policy.model


@contextmanager
def pure_bf16(folder, tmp_path):
    policy = load_policy(folder)
    prepare_policy(policy, SINGLE, dtype=BF16, pure=True)  # --pure-bf16: bf16 weights, no master copy
    yield policy.model


@contextmanager
def fsdp_pure_bf16(folder, tmp_path):
    with gloo_group(str(tmp_path / "store")) as d:
        policy = load_policy(folder)
        prepare_policy(policy, d, dtype=BF16, pure=True)
        with full_params(policy, d):
            yield policy.model


@contextmanager
def fsdp_reference(folder, tmp_path):
    with gloo_group(str(tmp_path / "store")) as d:
        ref = train.make_reference(load_policy(folder), folder, bf16_config(), d)
        with full_params(ref, d):
            yield ref.model


BF16_MODELS = {
    "load_policy(tiny, bf16)": loaded_tiny,
    "load_policy(folder, bf16)": loaded,
    "eval.py --dtype bf16": eval_loaded,
    "bf16 sampling copy": sampling_copy,
    "bf16 KL reference": kl_reference,
    "FSDP gathered bf16 parameters": fsdp_gathered,
    "FSDP bf16 KL reference": fsdp_reference,
    "--offload gathered bf16 parameters": offload_gathered,
    "--pure-bf16": pure_bf16,
    "--pure-bf16 under FSDP": fsdp_pure_bf16,
}


def dtypes_in_text_forward(model) -> dict[str, torch.dtype]:
    """The dtype of every rotary buffer as the text model's forward reads it."""
    seen, handles = {}, []
    for name, module in model.named_modules():
        if hasattr(module, "inv_freq"):
            def record(mod, args, name=name):
                seen.update({f"{name}.{n}": b.dtype for n, b in mod.named_buffers(recurse=False)})
            handles.append(module.register_forward_pre_hook(record))
    try:
        with torch.no_grad():
            model.model.language_model(input_ids=torch.tensor([[5, 6, 7, 8]]))
    finally:
        for h in handles:
            h.remove()
    return seen


@pytest.mark.parametrize("path", list(BF16_MODELS))
def test_every_bf16_model_keeps_its_rotary_buffers_fp32(path, saved_tiny, tmp_path):
    with BF16_MODELS[path](saved_tiny, tmp_path) as model:
        assert {p.dtype for p in model.parameters()} == {BF16}  # it is a bf16 model (else nothing is tested)
        buffers = {n: b.dtype for n, b in model.named_buffers() if b.is_floating_point()}
        assert any(n.endswith("inv_freq") for n in buffers), buffers
        assert all(d == torch.float32 for d in buffers.values()), buffers
        in_forward = dtypes_in_text_forward(model)
        assert in_forward and all(d == torch.float32 for d in in_forward.values()), in_forward


def test_the_fp32_buffers_are_the_ones_an_fp32_model_has(saved_tiny):
    """Kept fp32, and not recomputed differently: equal to the fp32 model's own buffers."""
    fp32 = dict(load_policy(saved_tiny).model.named_buffers())
    bf16 = dict(load_policy(saved_tiny, dtype=BF16).model.named_buffers())
    assert fp32.keys() == bf16.keys() and all(torch.equal(fp32[k], bf16[k]) for k in fp32)
