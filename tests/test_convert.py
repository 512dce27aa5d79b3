"""tools/convert_checkpoint.py and Hugging Face teachers: HF <-> framework at every tp/pp, exact tensors,
logits and greedy generation after a round trip, a trained checkpoint's loss in transformers, tokenizer
export with the same ids as sentencepiece, refusals that leave nothing behind, and ``hf:`` KI teachers.

Every model is a tiny random transformers model created here (no network).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

transformers = pytest.importorskip("transformers")

from megatron_ki.config import Config, DataConfig, KIConfig  # noqa: E402
from megatron_ki.convert.hf import HFWeights, config_from_hf, open_hf_model  # noqa: E402
from megatron_ki.convert.reshard import load_full_state, shard_state_dict, write_checkpoint  # noqa: E402
from megatron_ki.convert.tokenizer import TokenizerMismatchError, export_tokenizer  # noqa: E402
from megatron_ki.models import build_model  # noqa: E402
from megatron_ki.tensor_parallel.cross_entropy import vocab_parallel_cross_entropy  # noqa: E402
from tests.test_models_hf import batch_for, randomize, tiny_hf  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "convert_checkpoint.py"
LAYOUTS = [(1, 1), (2, 1), (1, 2), (2, 2)]
FAMILIES = ["gpt2", "llama", "bert", "roberta"]
AUTO = {"gpt2": "AutoModelForCausalLM", "llama": "AutoModelForCausalLM"}


def _tool():
    spec = importlib.util.spec_from_file_location("convert_checkpoint", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


cc = _tool()


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(TOOL), *args, "--no-progress"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )


def hf_tensors(path: Path) -> dict[str, torch.Tensor]:
    weights = HFWeights(path)
    return {k: weights[k] for k in weights}


def assert_no_leftovers(parent: Path, name: str) -> None:
    assert not (parent / name).exists(), f"{parent / name} was left behind"
    assert not [p for p in parent.iterdir() if p.name.startswith(f".{name}.")], (
        "a temporary directory was left"
    )


def framework_model(ckpt: Path, vocab_multiple: int | None = None):
    """The single-process framework model holding a checkpoint saved at any tp/pp."""
    _, cfg, full = load_full_state(ckpt)
    model = build_model(cfg)
    model.load_state_dict(shard_state_dict(full, cfg, 1, 0), strict=True)
    return model.eval(), cfg


def greedy(model, ids: torch.Tensor, vocab: int, steps: int = 20) -> torch.Tensor:
    for _ in range(steps):
        with torch.no_grad():
            logits = model(ids)[..., :vocab]
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory) -> dict[str, tuple[Path, torch.nn.Module]]:
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for family in FAMILIES:
        model = tiny_hf(family)
        randomize(model)
        model.eval()
        model.save_pretrained(root / family)
        out[family] = (root / family, model)
    return out


# ------------------------------------------------------------------------------ round trips, families
@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_every_layout(family, hf_dirs, tmp_path):
    src, hf = hf_dirs[family]
    ref = hf_tensors(src)
    ids, kw = batch_for(family, hf.config.pad_token_id)
    with torch.no_grad():
        ref_logits = hf(input_ids=ids, **kw).logits
    for tp, pp in LAYOUTS:
        ckpt, back = tmp_path / f"ckpt_{tp}{pp}", tmp_path / f"back_{tp}{pp}"
        if (family, tp, pp) == ("llama", 2, 2):  # the command line, once per direction
            r = run_cli(
                "--from",
                "hf",
                "--load",
                str(src),
                "--save",
                str(ckpt),
                "--target-tp",
                "2",
                "--target-pp",
                "2",
            )
            assert r.returncode == 0, r.stderr
            r = run_cli("--to", "hf", "--load", str(ckpt), "--save", str(back))
            assert r.returncode == 0, r.stderr
            assert json.loads(r.stdout.strip().splitlines()[-1]) == {"saved": str(back)}
        else:
            cc.import_hf(src, ckpt, tp=tp, pp=pp, progress=False)
            cc.export_hf(ckpt, back, progress=False)
        meta = json.loads((ckpt / "converted" / "meta.json").read_text())
        assert meta["layout"] == {"tp": tp, "pp": pp, "dp": 1, "zero_stage": 0}
        # HF -> framework -> HF: the very same tensors (same names, shapes, dtypes, values)
        got = hf_tensors(back)
        assert set(got) == set(ref), f"{tp=} {pp=}"
        for k, v in ref.items():
            assert got[k].dtype == v.dtype
            torch.testing.assert_close(got[k], v, rtol=0, atol=0, msg=f"{k} {tp=} {pp=}")
        # the framework model after the checkpoint round trip computes transformers' logits
        model, cfg = framework_model(ckpt)
        with torch.no_grad():
            ours = model(ids, **kw)[..., : cfg.vocab_size]
        torch.testing.assert_close(ours, ref_logits, atol=1e-5, rtol=1e-5)
    # the exported directory loads with the Auto classes
    auto = getattr(transformers, AUTO.get(family, "AutoModelForMaskedLM"))
    reloaded = auto.from_pretrained(str(back), local_files_only=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids, **kw).logits, ref_logits, atol=1e-6, rtol=1e-6)
    assert (back / "generation_config.json").is_file() == (family in AUTO)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_greedy_generation_agrees(family, hf_dirs, tmp_path):
    src, hf = hf_dirs[family]
    cc.import_hf(src, tmp_path / "ckpt", tp=2, pp=2, progress=False)
    model, cfg = framework_model(tmp_path / "ckpt")
    prompt = torch.tensor([[5, 17, 42, 8]])
    with torch.no_grad():
        ref = hf.generate(prompt, max_new_tokens=20, do_sample=False, pad_token_id=0, eos_token_id=None)
    ours = greedy(model, prompt, cfg.vocab_size)
    assert ref.shape == (1, 24)
    assert torch.equal(ours, ref)


def test_sharded_safetensors_and_bfloat16(hf_dirs, tmp_path):
    src, _ = hf_dirs["llama"]
    cc.import_hf(src, tmp_path / "ckpt", tp=2, pp=1, progress=False)
    out = cc.export_hf(
        tmp_path / "ckpt", tmp_path / "hf", dtype="bfloat16", max_shard_size="20KB", progress=False
    )
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and not (out / "model.safetensors").exists()
    for f in files:
        assert (out / f).stat().st_size <= 20_000 + 4096  # one tensor may exceed; these do not
    model = transformers.AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True)
    ref = hf_tensors(src)
    assert model.config.dtype == torch.bfloat16
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, ref[k].to(torch.bfloat16), rtol=0, atol=0, msg=k)


def test_reshard_framework_checkpoint(hf_dirs, tmp_path):
    src, _ = hf_dirs["gpt2"]
    cc.import_hf(src, tmp_path / "a", tp=2, pp=2, progress=False)
    argv = [
        "--load",
        str(tmp_path / "a"),
        "--save",
        str(tmp_path / "b"),
        "--target-tp",
        "1",
        "--target-pp",
        "2",
    ]
    assert cc.main([*argv, "--no-progress"]) == 0
    meta = json.loads((tmp_path / "b" / "converted" / "meta.json").read_text())
    assert (
        meta["layout"]["tp"] == 1
        and meta["layout"]["pp"] == 2
        and meta["config"]["parallel"]["pipeline_parallel"] == 2
    )
    _, _, a = load_full_state(tmp_path / "a")
    _, cfg, b = load_full_state(tmp_path / "b")
    for k in a:
        rows = cfg.padded_vocab_size(1) if k.endswith("word_embeddings.weight") else a[k].shape[0]
        torch.testing.assert_close(b[k][:rows], a[k][:rows], rtol=0, atol=0, msg=k)


# -------------------------------------------------------------------------- a trained checkpoint's loss
def test_trained_checkpoint_loss_in_transformers(tmp_path):
    """Three AdamW steps on the framework model and its vocab-parallel loss, saved at tp=2/pp=2, exported:
    transformers' loss on a batch equals the framework's (no vocabulary padding, so both softmaxes are over
    the same entries)."""
    cfg = config_from_hf(tiny_hf("llama").config, make_vocab_size_divisible_by=1, vocab_size=128)
    cfg.make_vocab_size_divisible_by = 64  # 128 rows at tp=1 and tp=2: nothing padded
    torch.manual_seed(0)
    model = build_model(cfg, seed=3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(1))
    labels = torch.cat([ids[:, 1:], torch.full((4, 1), -100)], dim=1)

    def loss_of(m) -> torch.Tensor:
        per_token = vocab_parallel_cross_entropy(m(ids), labels)
        return per_token.sum() / (labels != -100).sum()

    losses = []
    for _ in range(3):
        opt.zero_grad()
        loss = loss_of(model)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    full = {k: v.detach().clone() for k, v in model.state_dict().items()}
    write_checkpoint(full, Config(model=cfg), tmp_path / "ckpt", tp=2, pp=2, tag="step00000003")
    out = cc.export_hf(tmp_path / "ckpt", tmp_path / "hf", progress=False)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True).eval()
    model.eval()
    with torch.no_grad():
        ours = loss_of(model)
        theirs = hf(input_ids=ids, labels=ids).loss
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)


def _deepspeed_train_worker(rank, world, root, zero):
    """3 steps of the real DeepSpeed engine on the tiny Llama at tp=2 (ZeRO ``zero``), saved by the framework's
    save_checkpoint; returns the trained model's loss on an evaluation batch (computed at tp=2)."""
    import os

    os.environ["DS_ACCELERATOR"] = "cpu"
    from megatron_ki.config import load_config
    from megatron_ki.parallel import ParallelGroups, Topology
    from megatron_ki.training.checkpoint import save_checkpoint
    from megatron_ki.training.ds_config import deepspeed_config
    from megatron_ki.training.engine import initialize_engine

    cfg = load_config(
        str(ROOT / "launch/configs/models/tiny_llama.yaml"),
        [
            "--parallel.tensor_parallel", "2", "--checkpoint.save", root, "--train.zero_stage", str(zero),
            "--train.precision", "fp32", "--train.micro_batch_size", "4", "--train.global_batch_size", "4",
            "--train.train_steps", "3", "--optim.lr", "1e-2", "--optim.lr_warmup_fraction", "0",
        ],
    )  # fmt: skip
    cfg.validate(world)
    groups = ParallelGroups.build(Topology.from_world(world, tp=2))
    model = build_model(cfg.model, tp_group=groups.tp_group, seed=5)
    engine = initialize_engine(cfg, model, groups, deepspeed_config(cfg, world))
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, cfg.model.vocab_size, (4, 16), generator=gen)
    labels = torch.cat([ids[:, 1:], torch.full((4, 1), -100)], dim=1)

    def loss_of(m) -> torch.Tensor:
        return vocab_parallel_cross_entropy(m(ids), labels, groups.tp_group).sum() / (labels != -100).sum()

    losses = []
    for _ in range(3):
        loss = loss_of(engine)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    save_checkpoint(engine, cfg, groups, step=3, consumed_samples=12)
    engine.module.eval()
    with torch.no_grad():
        return losses, loss_of(engine.module).item(), ids


@pytest.mark.slow
@pytest.mark.distributed
def test_deepspeed_trained_checkpoint_loss_in_transformers(tmp_path):
    """A checkpoint the real engine trained and saved (tp=2, ZeRO-1) converts to HF; transformers' loss on a
    batch equals the framework's (the tiny config has no vocabulary padding at tp=2)."""
    from tests.distributed import run_distributed

    root = tmp_path / "ckpt"
    (losses, framework_loss, ids), _ = run_distributed(_deepspeed_train_worker, 2, args=(str(root), 1))
    assert losses[-1] < losses[0]
    meta = json.loads((root / "step00000003" / "meta.json").read_text())
    assert meta["layout"]["tp"] == 2 and meta["layout"]["zero_stage"] == 1 and not meta["weights_only"]
    out = cc.export_hf(root, tmp_path / "hf", progress=False)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True).eval()
    with torch.no_grad():
        hf_loss = hf(input_ids=ids, labels=ids).loss.item()
    assert hf_loss == pytest.approx(framework_loss, abs=1e-5)


# ----------------------------------------------------------------------------------------- tokenizer
EDGE_TEXTS = [
    "hello world",
    " leading space",
    "trailing space ",
    "double  space",
    "  many   spaces  around  ",
    "line one\nline two",
    "\n\nstarts with newlines",
    "tab\tseparated\tvalues\t",
    "emoji 😀🎉 in text",
    "東京は日本の首都です",
    "中文测试 mixed with English",
    "Café naïve résumé façade",
    "ÅÄÖ åäö ñ ç ß",
    "ﬁ ligature and full-width ＡＢＣ",
    "no\u00a0break space",
    "\r\nwindows line ends\r\n",
    "digits 1234567890 3.14159",
    "a<mask>b <pad> text <eod> end",
    "",
    " ",
    "\t\n",
]


def _sp_model(root: Path, model_type: str, vocab: int, byte_fallback: bool) -> str:
    from megatron_ki.data.train_tokenizer import train_sentencepiece
    from tests.training_utils import synthetic_documents

    corpus = root / "corpus.jsonl"
    if not corpus.exists():
        lines = synthetic_documents(150) + [t for t in EDGE_TEXTS if t.strip()] * 10
        corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in lines), encoding="utf-8")
    return train_sentencepiece(
        str(corpus),
        str(root / f"sp_{model_type}_{int(byte_fallback)}"),
        vocab,
        model_type=model_type,
        special_tokens=["<mask>", "<pad>", "<eod>"],
        sample_size=0,
        byte_fallback=byte_fallback,
    )


@pytest.mark.parametrize("model_type,vocab,byte_fallback", [("bpe", 400, False), ("unigram", 420, True)])
def test_sentencepiece_export_same_ids(tmp_path, model_type, vocab, byte_fallback):
    import sentencepiece as spm

    model_file = _sp_model(tmp_path, model_type, vocab, byte_fallback)
    sp = spm.SentencePieceProcessor(model_file=model_file)
    export_tokenizer(model_file, tmp_path / "hf")
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"), local_files_only=True)
    assert len(tok) == sp.get_piece_size()
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (sp.unk_id(), sp.bos_id(), sp.eos_id())
    assert tok.mask_token_id == sp.piece_to_id("<mask>") and tok.pad_token_id == sp.piece_to_id("<pad>")
    for text in EDGE_TEXTS:
        assert tok(text, add_special_tokens=False)["input_ids"] == sp.encode(text), repr(text)
    if byte_fallback:  # unseen characters become the same byte pieces, and decode back
        assert tok.decode(sp.encode("snow ☃ man")) == sp.decode(sp.encode("snow ☃ man"))


def test_export_writes_the_checkpoint_tokenizer(hf_dirs, tmp_path):
    model_file = _sp_model(tmp_path, "bpe", 400, False)
    model = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(**{**tiny_hf("llama").config.to_dict(), "vocab_size": 400})
    )
    model.save_pretrained(tmp_path / "src")
    cc.import_hf(tmp_path / "src", tmp_path / "ckpt", tp=2, pp=1, progress=False)
    meta_path = tmp_path / "ckpt" / "converted" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["tokenizer"] = {
        "type": "SentencePieceTokenizer",
        "model": model_file,
    }  # as a training run records it
    meta_path.write_text(json.dumps(meta))
    out = cc.export_hf(tmp_path / "ckpt", tmp_path / "hf", progress=False)
    tok = transformers.AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=model_file)
    assert tok("Café  東京 😀", add_special_tokens=False)["input_ids"] == sp.encode("Café  東京 😀")
    hf_cfg = json.loads((out / "config.json").read_text())
    assert (hf_cfg["bos_token_id"], hf_cfg["eos_token_id"]) == (sp.bos_id(), sp.eos_id())
    assert hf_cfg["architectures"] == ["LlamaForCausalLM"]
    # a checkpoint imported from that directory records its tokenizer, and exports it again as it is
    cc.import_hf(out, tmp_path / "ckpt2", tp=1, pp=2, progress=False)
    meta = json.loads((tmp_path / "ckpt2" / "converted" / "meta.json").read_text())
    assert meta["tokenizer"] == {"type": "HuggingFaceTokenizer", "model": str(out.resolve())}
    again = cc.export_hf(tmp_path / "ckpt2", tmp_path / "hf2", progress=False)
    assert (again / "tokenizer.json").read_bytes() == (out / "tokenizer.json").read_bytes()


# -------------------------------------------------------------------------------------------- refusals
def _edit_config(src: Path, dst: Path, **changes) -> Path:
    import shutil

    shutil.copytree(src, dst)
    data = json.loads((dst / "config.json").read_text())
    data.update(changes)
    (dst / "config.json").write_text(json.dumps(data))
    return dst


@pytest.mark.parametrize(
    "family,changes,message",
    [
        ("llama", {"model_type": "t5", "architectures": ["T5ForConditionalGeneration"]}, "model_type 't5'"),
        (
            "llama",
            {"rope_parameters": {"rope_type": "yarn", "factor": 2.0, "rope_theta": 500.0}},
            "rope.*'yarn'.*unsupported",
        ),
        ("llama", {"hidden_act": "gelu"}, "hidden_act 'gelu' unsupported"),
        ("llama", {"architectures": ["LlamaForSequenceClassification"]}, "LlamaForSequenceClassification"),
        ("gpt2", {"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
        ("gpt2", {"n_inner": 48}, "shape"),
        ("bert", {"position_embedding_type": "relative_key"}, "position_embedding_type 'relative_key'"),
        ("bert", {"is_decoder": True}, "is_decoder"),
    ],
)
def test_unsupported_models_are_refused(family, changes, message, hf_dirs, tmp_path):
    src = _edit_config(hf_dirs[family][0], tmp_path / "src", **changes)
    with pytest.raises(ValueError, match=message):
        cc.import_hf(src, tmp_path / "out", tp=1, pp=1, progress=False)
    assert_no_leftovers(tmp_path, "out")


def test_refusals_name_the_problem_and_leave_nothing(hf_dirs, tmp_path, capsys):
    src, _ = hf_dirs["llama"]  # 4 heads, 2 key/value heads
    argv = ["--from", "hf", "--load", str(src), "--save", str(tmp_path / "out"), "--target-tp", "4"]
    assert cc.main(argv) == 1
    assert "--target-tp 4 does not divide the model's key/value heads (2)" in capsys.readouterr().err
    assert_no_leftovers(tmp_path, "out")
    with pytest.raises(cc.ConversionError, match="--target-tp 3 does not divide the model's heads"):
        cc.import_hf(src, tmp_path / "out", tp=3, pp=1, progress=False)
    with pytest.raises(cc.ConversionError, match="--target-pp 3 is more than the model's 2 layers"):
        cc.import_hf(src, tmp_path / "out", tp=1, pp=3, progress=False)
    # missing weight file
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(src, broken)
    (broken / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        cc.import_hf(broken, tmp_path / "out", progress=False)
    # a tensor missing from the weights: found only while streaming, after files were written
    from safetensors.torch import save_file

    tensors = hf_tensors(src)
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, broken / "model.safetensors")
    with pytest.raises(KeyError, match="model.layers.1.mlp.down_proj.weight"):
        cc.import_hf(broken, tmp_path / "out", tp=2, pp=2, progress=False)
    assert_no_leftovers(tmp_path, "out")
    # a framework checkpoint with a missing file: export fails, no output directory
    cc.import_hf(src, tmp_path / "ckpt", tp=2, pp=2, progress=False)
    (tmp_path / "ckpt" / "converted" / "layer_02-model_01-model_states.pt").unlink()
    assert cc.main(["--to", "hf", "--load", str(tmp_path / "ckpt"), "--save", str(tmp_path / "hf_out")]) == 1
    assert "layer_02-model_01-model_states.pt" in capsys.readouterr().err
    assert_no_leftovers(tmp_path, "hf_out")
    assert (
        cc.main(["--to", "hf", "--load", str(tmp_path / "nothing"), "--save", str(tmp_path / "hf_out")]) == 1
    )
    assert "checkpoint directory not found" in capsys.readouterr().err
    # an existing output survives a failed conversion untouched
    (tmp_path / "keep").mkdir()
    (tmp_path / "keep" / "file").write_text("x")
    with pytest.raises(Exception, match="layer_02-model_01"):
        cc.export_hf(tmp_path / "ckpt", tmp_path / "keep", progress=False)
    assert (tmp_path / "keep" / "file").read_text() == "x"


# ------------------------------------------------------------------------------------------ HF teachers
def _student_config(tokenizer: str, teacher_path: str) -> Config:
    cfg = config_from_hf(tiny_hf("llama").config, make_vocab_size_divisible_by=8, vocab_size=400)
    return Config(
        model=cfg,
        ki=KIConfig(enabled=True, teacher_path=teacher_path),
        data=DataConfig(
            tokenizer_type="SentencePieceTokenizer",
            tokenizer_model=tokenizer,
            seq_length=cfg.max_position_embeddings,
        ),
    )


def test_hf_teacher_equals_framework_teacher(tmp_path):
    from megatron_ki.training.run import load_teacher_weights

    model_file = _sp_model(tmp_path, "bpe", 400, False)
    hf = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(**{**tiny_hf("llama").config.to_dict(), "vocab_size": 400})
    )
    randomize(hf)
    hf.save_pretrained(tmp_path / "teacher_hf")
    export_tokenizer(model_file, tmp_path / "teacher_hf")
    cc.import_hf(
        tmp_path / "teacher_hf",
        tmp_path / "teacher_ckpt",
        tp=1,
        pp=1,
        make_vocab_size_divisible_by=8,
        progress=False,
    )
    for rank in range(2):  # the pretrain-style call of each TP rank of a tp=2 run
        groups = SimpleNamespace(topology=SimpleNamespace(tp=2, pp=1), tp_rank=rank)
        t_cfg, state = load_teacher_weights(
            _student_config(model_file, f"hf:{tmp_path / 'teacher_hf'}"), groups
        )
        _, ref = load_teacher_weights(_student_config(model_file, str(tmp_path / "teacher_ckpt")), groups)
        assert t_cfg.num_key_value_heads == 2 and t_cfg.vocab_size == 400
        assert set(state) == set(ref)
        for k in ref:
            torch.testing.assert_close(state[k], ref[k], rtol=0, atol=0, msg=k)
    # the tp=2 shards hold the HF model: rank 0's query rows are the first half of q_proj's
    q = hf.state_dict()["model.layers.0.self_attn.q_proj.weight"]
    groups = SimpleNamespace(topology=SimpleNamespace(tp=2, pp=1), tp_rank=0)
    _, state = load_teacher_weights(_student_config(model_file, f"hf:{tmp_path / 'teacher_hf'}"), groups)
    torch.testing.assert_close(
        state["layers.0.attention.qkv.weight"][: q.shape[0] // 2], q[: q.shape[0] // 2]
    )


def test_hf_teacher_with_another_tokenizer_is_refused(tmp_path):
    from megatron_ki.training.run import load_teacher_weights

    student_tok = _sp_model(tmp_path, "bpe", 400, False)
    other_tok = _sp_model(tmp_path, "unigram", 420, True)
    hf = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(**{**tiny_hf("llama").config.to_dict(), "vocab_size": 400})
    )
    hf.save_pretrained(tmp_path / "teacher_hf")
    export_tokenizer(other_tok, tmp_path / "teacher_hf")
    import sentencepiece as spm

    a, b = (
        spm.SentencePieceProcessor(model_file=student_tok),
        spm.SentencePieceProcessor(model_file=other_tok),
    )
    first = next(i for i in range(400) if a.id_to_piece(i) != b.id_to_piece(i))
    groups = SimpleNamespace(topology=SimpleNamespace(tp=2, pp=1), tp_rank=0)
    cfg = _student_config(student_tok, f"hf:{tmp_path / 'teacher_hf'}")
    expected = f"at id {first}: student {a.id_to_piece(first)!r}, teacher {b.id_to_piece(first)!r}"
    with pytest.raises(TokenizerMismatchError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        load_teacher_weights(cfg, groups)
    # no tokenizer at all in the teacher directory: refused too
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "teacher_hf" / f).unlink()
    with pytest.raises(TokenizerMismatchError, match="no tokenizer.json"):
        load_teacher_weights(cfg, groups)


def test_open_hf_model_streams_the_weights(hf_dirs):
    """Reading a tensor reads only that tensor: nothing is cached between reads."""
    src, hf = hf_dirs["bert"]
    cfg, state = open_hf_model(src, make_vocab_size_divisible_by=16)
    assert cfg.family == "bert" and len(state) == len(list(build_model(cfg).state_dict()))
    a, b = state["layers.0.attention.qkv.weight"], state["layers.0.attention.qkv.weight"]
    assert a.data_ptr() != b.data_ptr()
    q = hf.state_dict()["bert.encoder.layer.0.attention.self.query.weight"]
    torch.testing.assert_close(a[: q.shape[0]], q, rtol=0, atol=0)


def test_pytorch_bin_weights_are_read(hf_dirs, tmp_path):
    import shutil

    src, hf = hf_dirs["roberta"]
    shutil.copytree(src, tmp_path / "bin")
    (tmp_path / "bin" / "model.safetensors").unlink()
    torch.save(hf.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    cc.import_hf(tmp_path / "bin", tmp_path / "ckpt", tp=2, pp=1, progress=False)
    cc.export_hf(tmp_path / "ckpt", tmp_path / "back", progress=False)
    ref, got = hf_tensors(src), hf_tensors(tmp_path / "back")
    assert set(ref) == set(got)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=0, atol=0, msg=k)


@pytest.mark.parametrize("tp,pp", [(2, 1), (2, 2)])
def test_lazy_full_state_equals_load_full_state(hf_dirs, tmp_path, tp, pp):
    from megatron_ki.convert.reshard import LazyFullState

    cc.import_hf(hf_dirs["bert"][0], tmp_path / "ckpt", tp=tp, pp=pp, progress=False)
    _, _, full = load_full_state(tmp_path / "ckpt")
    lazy = LazyFullState(tmp_path / "ckpt")
    seen = []
    lazy.on_load = seen.append
    assert list(lazy) == list(full)
    for k, v in full.items():
        torch.testing.assert_close(lazy[k], v, rtol=0, atol=0, msg=k)
    assert seen == list(full)


# ------------------------------------------------------------------------- tensors the mapping would drop
def _with_tensors(src: Path, dst: Path, extra: dict[str, torch.Tensor]) -> Path:
    import shutil

    from safetensors.torch import save_file

    shutil.copytree(src, dst)
    save_file({**hf_tensors(src), **extra}, dst / "model.safetensors")
    return dst


def test_unmapped_hf_tensors_are_refused(hf_dirs, tmp_path, capsys):
    """Qwen2-style q/k/v biases under a Llama config.json without attention_bias: refused, not dropped."""
    src, _ = hf_dirs["llama"]
    biases = {
        f"model.layers.{i}.self_attn.{x}_proj.bias": torch.ones(n)
        for i in range(2)
        for x, n in (("q", 32), ("k", 16), ("v", 16))
    }
    qwen = _with_tensors(src, tmp_path / "qwen", biases)
    argv = ["--from", "hf", "--load", str(qwen), "--save", str(tmp_path / "out")]
    assert cc.main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "6 Hugging Face tensor(s) that the llama mapping of config.json does not use" in err, err
    assert "model.layers.0.self_attn.k_proj.bias" in err and "(6 in all)" in err, err
    assert_no_leftovers(tmp_path, "out")
    with pytest.raises(ValueError, match="q_proj.bias"):
        open_hf_model(qwen, make_vocab_size_divisible_by=16)


def test_derivable_buffers_and_unused_heads_are_accepted(hf_dirs, tmp_path, caplog):
    """Buffers a model recomputes (rotary inv_freq, GPT-2's causal mask, position ids) are skipped; the
    pooler and next-sentence head of a BertForPreTraining checkpoint are dropped with a warning."""
    llama = _with_tensors(
        hf_dirs["llama"][0],
        tmp_path / "llama",
        {f"model.layers.{i}.self_attn.rotary_emb.inv_freq": torch.ones(4) for i in range(2)},
    )
    gpt2 = _with_tensors(
        hf_dirs["gpt2"][0],
        tmp_path / "gpt2",
        {
            "transformer.h.0.attn.bias": torch.ones(1, 1, 4, 4),
            "transformer.h.0.attn.masked_bias": torch.ones(()),
        },
    )
    bert = _with_tensors(
        hf_dirs["bert"][0],
        tmp_path / "bert",
        {
            "bert.embeddings.position_ids": torch.arange(32)[None],
            "bert.pooler.dense.weight": torch.ones(32, 32),
            "bert.pooler.dense.bias": torch.ones(32),
            "cls.seq_relationship.weight": torch.ones(2, 32),
            "cls.seq_relationship.bias": torch.ones(2),
        },
    )
    for src in (llama, gpt2, bert):
        caplog.clear()
        with caplog.at_level("WARNING"):
            cc.import_hf(src, tmp_path / f"{src.name}_ckpt", progress=False)
        dropped = [r.getMessage() for r in caplog.records if "dropping" in r.getMessage()]
        if src is bert:
            assert len(dropped) == 1 and "4 tensor(s)" in dropped[0] and "cls.seq_relationship" in dropped[0]
        else:
            assert dropped == []
