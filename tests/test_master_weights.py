"""``tools/convert_checkpoint.py --weights master`` exports the fp32 master weights of a bf16 + ZeRO-1 run.

A tiny Llama trains two bf16 steps at dp=2 (DeepSpeed's BF16 optimizer: each data-parallel rank holds half of
every flat fp32 group) and is saved. The live engine's full fp32 masters, gathered by DeepSpeed's own
``safe_get_full_fp32_param`` (independent of the checkpoint reader), are the reference: the export must equal
them bitwise (tolerance 0) and must differ from the bf16 weights (so the test can fail), in a framework
checkpoint and in a Hugging Face export. A weights-only checkpoint, or one whose optimizer partitions are
missing, is refused with one line on stderr and exit code 1.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_ki.config import load_config
from megatron_ki.convert.reshard import load_full_state
from tests.distributed import run_distributed
from tests.test_convert import cc

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 500
STEPS = 2


def _save_worker(rank, world, ckpt, run_dir):
    os.environ["DS_ACCELERATOR"] = "cpu"
    from deepspeed.utils import safe_get_full_fp32_param

    from megatron_ki.training.checkpoint import save_checkpoint
    from megatron_ki.training.loop import Trainer
    from megatron_ki.training.run import build_run

    cfg = load_config(
        str(ROOT / "launch/configs/models/tiny_llama.yaml"),
        [
            "--model.vocab_size", str(VOCAB),
            "--train.precision", "bf16",
            "--train.zero_stage", "1",
            "--train.micro_batch_size", "1",
            "--train.global_batch_size", "2",
            "--data.seq_length", "8",
            "--optim.lr", "1e-2",
            "--checkpoint.save", ckpt,
            "--logging.run_dir", run_dir,
        ],
    )  # fmt: skip
    run = build_run(cfg, world, data=False)
    trainer = Trainer(run)
    gen = torch.Generator().manual_seed(11 + run.groups.dp_rank)

    def batches():
        while True:
            ids = torch.randint(0, VOCAB, (1, 9), generator=gen)
            yield (
                (ids[:, :-1], torch.ones(1, 8, dtype=torch.long), torch.zeros(1, 8, dtype=torch.long)),
                ids[:, 1:],
            )

    data = batches()
    for _ in range(STEPS):
        trainer.train_step(data)
    save_checkpoint(run.engine, cfg, run.groups, STEPS, STEPS * 2)
    module = run.engine.module
    master = {n: safe_get_full_fp32_param(p).clone() for n, p in module.named_parameters()}
    return master, {n: p.detach().clone() for n, p in module.named_parameters()}


@pytest.fixture(scope="module")
def bf16_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("master")
    ckpt = root / "ckpt"
    master, weights = run_distributed(_save_worker, 2, args=(str(ckpt), str(root / "run")))[0]
    return ckpt, master, weights


@pytest.mark.distributed
def test_master_export_equals_the_fp32_partitions(bf16_run, tmp_path: Path):
    ckpt, master, weights = bf16_run
    assert all(w.dtype == torch.bfloat16 for w in weights.values())
    out = tmp_path / "fw"
    assert cc.main(["--load", str(ckpt), "--save", str(out), "--target-tp", "2", "--weights", "master"]) == 0
    _, _, full = load_full_state(out)
    assert set(full) == set(master)
    for name, want in master.items():  # vocabulary tensors: padded to 504 rows at tp=1, 512 at tp=2
        got = full[name][: want.shape[0]]
        assert got.dtype == torch.float32 and not got.requires_grad and torch.equal(got, want), name
    differs = [n for n in master if not torch.equal(master[n], weights[n].float())]
    assert len(differs) == len(master), f"master equals the bf16 weights for {set(master) - set(differs)}"
    model_out = tmp_path / "fw_model"
    assert cc.main(["--load", str(ckpt), "--save", str(model_out), "--target-tp", "1"]) == 0
    _, _, bf16 = load_full_state(model_out)
    assert all(torch.equal(bf16[n], weights[n]) for n in weights)  # the default stays the working dtype

    hf = tmp_path / "hf"
    assert (
        cc.main(
            ["--to", "hf", "--load", str(ckpt), "--save", str(hf), "--weights", "master", "--no-tokenizer"]
        )
        == 0
    )
    from safetensors.torch import load_file

    tensors = load_file(hf / "model.safetensors")
    emb = tensors["model.embed_tokens.weight"]
    assert emb.dtype == torch.float32
    assert torch.equal(emb, master["embedding.word_embeddings.weight"][:VOCAB])
    assert torch.equal(tensors["model.norm.weight"], master["head.final_norm.weight"])


def _refused(capsys, *args: str) -> str:
    """The one error line ``convert_checkpoint.py`` prints for ``args`` (it must exit with 1)."""
    capsys.readouterr()
    assert cc.main([*args, "--no-progress"]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.distributed
def test_master_export_refuses_checkpoints_without_masters(bf16_run, tmp_path: Path, capsys):
    ckpt, _, _ = bf16_run
    weights_only = tmp_path / "wo"
    assert (
        cc.main(["--load", str(ckpt), "--save", str(weights_only), "--target-tp", "1", "--no-progress"]) == 0
    )
    line = _refused(
        capsys,
        "--to",
        "hf",
        "--weights",
        "master",
        "--load",
        str(weights_only),
        "--save",
        str(tmp_path / "x"),
    )
    assert "weights-only" in line and str(weights_only) in line and not (tmp_path / "x").exists()

    broken = tmp_path / "broken"
    shutil.copytree(ckpt, broken)
    tag = (broken / "latest").read_text().strip()
    (missing,) = list((broken / tag).glob("*zero_pp_rank_1_mp_rank_00_optim_states.pt"))
    missing.unlink()
    line = _refused(
        capsys,
        "--target-tp",
        "1",
        "--weights",
        "master",
        "--load",
        str(broken),
        "--save",
        str(tmp_path / "y"),
    )
    assert "zero_pp_rank_0..1_mp_rank_00_optim_states.pt" in line and not (tmp_path / "y").exists()
    line = _refused(
        capsys, "--from", "hf", "--weights", "master", "--load", str(tmp_path), "--save", str(tmp_path / "z")
    )
    assert "--weights master" in line


@pytest.mark.distributed
def test_deepspeeds_zero_to_fp32_reads_the_bf16_checkpoint(bf16_run, tmp_path: Path):
    ckpt, master, _ = bf16_run
    out = tmp_path / "z2f"
    done = subprocess.run(
        [sys.executable, str(ckpt / "zero_to_fp32.py"), str(ckpt), str(out), "--safe_serialization"],
        capture_output=True,
        text=True,
        env={**os.environ, "DS_ACCELERATOR": "cpu"},
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    from safetensors.torch import load_file

    got = load_file(out / "model.safetensors")
    assert set(got) == set(master)
    for name, want in master.items():
        assert torch.equal(got[name], want), name
