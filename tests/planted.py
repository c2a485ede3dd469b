"""Malicious files for the checkpoint tests: a pickle that runs code when loaded, planted in a run folder,
and checkpoints rewritten in the older (pickled) format."""
import os
import pickle
import shutil

import torch

# Every place of a run folder where some loader could look for a pickle (the older checkpoint format's
# files, and the names under which torch, transformers and DCP write pickles).
PLANTED = ("trainer_state.pt", "rng_state.pth", "optimizer/.metadata", "optimizer/__0_0.distcp",
           "model/pytorch_model.bin", "model/training_args.bin")
PLANTED_IN_RUN = ("reference/pytorch_model.bin",)


class Payload:
    """Unpickling this runs `exec(code)`: here, creating the file `marker`."""

    def __init__(self, marker: str):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


def payload(marker) -> bytes:
    return pickle.dumps(Payload(marker))


def plant_pickles(run_dir, marker) -> None:
    """Put the payload into the latest checkpoint of `run_dir` (and the run folder) under every name in
    PLANTED, beside the safe files."""
    ckpt = latest(run_dir)
    targets = [os.path.join(ckpt, rel) for rel in PLANTED]
    if os.path.isdir(os.path.join(run_dir, "reference")):  # the KL reference that the warm-up wrote
        targets += [os.path.join(run_dir, rel) for rel in PLANTED_IN_RUN]
    for path in targets:
        with open(path, "wb") as f:
            f.write(payload(marker))


def latest(run_dir) -> str:
    with open(os.path.join(run_dir, "latest")) as f:
        return os.path.join(run_dir, f.read().strip())


def make_malicious_older_format(run_dir, marker) -> None:
    """Turn the latest checkpoint into one of the older format whose pickles are the payload."""
    ckpt = latest(run_dir)
    os.remove(os.path.join(ckpt, "trainer_state.json"))
    shutil.rmtree(os.path.join(ckpt, "optimizer"))
    os.makedirs(os.path.join(ckpt, "optimizer"))
    for rel in ("trainer_state.pt", "optimizer/.metadata"):
        with open(os.path.join(ckpt, rel), "wb") as f:
            f.write(payload(marker))


def make_genuine_older_format(run_dir) -> None:
    """Rewrite the latest checkpoint exactly as the code before the safe format wrote it: trainer_state.pt
    (torch.save of step, RNG objects and extra) and the optimizer through torch.distributed.checkpoint."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    from timerpo.checkpoint import load_optimizer, load_trainer_state, quiet_single_process
    from timerpo.distributed import SINGLE
    from timerpo.policy import load_policy

    ckpt = latest(run_dir)
    state = load_trainer_state(ckpt)
    policy = load_policy(os.path.join(ckpt, "model"))
    optimizer = torch.optim.AdamW(policy.model.parameters())
    load_optimizer(policy, optimizer, os.path.join(ckpt, "optimizer"), SINGLE)
    shutil.rmtree(os.path.join(ckpt, "optimizer"))
    with quiet_single_process():
        dcp.save(get_optimizer_state_dict(policy.model, optimizer), checkpoint_id=os.path.join(ckpt, "optimizer"),
                 no_dist=True)
    torch.save({"step": state["step"], "rng": state["rng"], "extra": state["extra"]},
               os.path.join(ckpt, "trainer_state.pt"))
    os.remove(os.path.join(ckpt, "trainer_state.json"))
