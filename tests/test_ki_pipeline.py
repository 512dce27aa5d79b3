"""The teacher inside the student's pipeline stages: KI loss and student gradients equal a single-process
student + teacher; the teacher gets no gradient, does not change, and stops running once alpha is 0."""

import os

import pytest
import torch

from megatron_ki.config import KIConfig, ModelConfig, load_config
from megatron_ki.models import build_model, partition_info
from megatron_ki.models.pipe import teacher_layers_for
from megatron_ki.tensor_parallel import unshard_rows
from tests.distributed import run_distributed

ALPHA = 0.7
SEQ, MICRO = 12, 2


def _configs(family: str) -> tuple[ModelConfig, ModelConfig]:
    student = load_config(f"launch/configs/models/tiny_{family}.yaml").model
    # A teacher of another depth and width (3 layers, hidden 32) with the same vocabulary.
    teacher = ModelConfig(
        **{
            **student.__dict__,
            "num_layers": 3,
            "hidden_size": 32,
            "ffn_hidden_size": 64,
            "num_attention_heads": 4,
        }
    )
    return student, teacher


def _batch(family: str):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 500, (MICRO, SEQ), generator=g)
    mask = torch.ones_like(ids)
    labels = ids.clone()
    if family == "roberta":
        mask[1, 9:] = 0
        ids = ids.masked_fill(mask == 0, 1)
        labels = torch.full_like(ids, -100)
        labels[:, 1:8:2] = ids[:, 1:8:2]
    else:
        labels[:, ::4] = -100
    return ids, mask, torch.zeros_like(ids), labels


def _reference(family: str):
    from megatron_ki.ki import ki_loss

    student_cfg, teacher_cfg = _configs(family)
    student = build_model(student_cfg, seed=7)
    teacher = build_model(teacher_cfg, seed=11).eval().requires_grad_(False)
    ids, mask, _, labels = _batch(family)
    out = ki_loss(
        student(ids, attention_mask=mask), teacher(ids, attention_mask=mask), labels, ALPHA, temperature=2.0
    )
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in student.named_parameters()}
    return out.loss.item(), out.teacher_lm_loss.item(), grads


def _full_name(pipe_name: str, num_layers: int) -> str:
    idx, _, rest = pipe_name.split(".", 2)  # "<layer index>.model.<name in the slice model>"
    idx = int(idx)
    if idx == 0 or idx == num_layers + 1:
        return rest
    tail = rest.split(".", 2)[2]  # layers.0.<...>
    return f"layers.{idx - 1}.{tail}"


def _pipe_worker(rank, world, tp, pp, family, alphas, partition="parameters", fused=False, sp=False):
    os.environ["DS_ACCELERATOR"] = "cpu"
    from megatron_ki.ki.teacher import KILossFunction
    from megatron_ki.models.pipe import HeadPipe, PipelinedTeacher
    from megatron_ki.parallel import ParallelGroups, Topology
    from megatron_ki.training.ds_config import deepspeed_config
    from megatron_ki.training.engine import initialize_engine
    from megatron_ki.training.flops import pipeline_layer_costs
    from megatron_ki.training.run import build_pipeline_module

    student_cfg, teacher_cfg = _configs(family)
    cfg = load_config(
        None,
        [
            "--parallel.tensor_parallel",
            str(tp),
            "--parallel.pipeline_parallel",
            str(pp),
            "--train.micro_batch_size",
            str(MICRO),
            "--train.global_batch_size",
            str(MICRO),
            "--optim.lr",
            "1e-3",
            "--optim.lr_warmup_fraction",
            "0",
            "--optim.clip_grad",
            "0",
            "--optim.weight_decay",
            "0",
            "--ki.enabled",
            "true",
            "--ki.teacher_path",
            "unused",
        ],
    )
    cfg.model = student_cfg
    groups = ParallelGroups.build(Topology.from_world(world, tp=tp, pp=pp))
    pipe_teacher = PipelinedTeacher(teacher_cfg, seed=11, dtype="float32", sequence_parallel=sp)
    loss_fn = KILossFunction(KIConfig(enabled=True, teacher=teacher_cfg, temperature=2.0), groups.tp_group)
    costs = pipeline_layer_costs(
        student_cfg,
        SEQ,
        teacher_cfg,
        teacher_layers_for(student_cfg.num_layers, teacher_cfg.num_layers),
        tp,
    )
    module = build_pipeline_module(
        student_cfg,
        groups.topology,
        groups,
        seed=7,
        loss_fn=loss_fn,
        pipe_teacher=pipe_teacher,
        partition_method=partition,
        layer_costs=costs,
        head_inputs=fused,
        sequence_parallel=sp,
    )
    engine = initialize_engine(cfg, module, groups, deepspeed_config(cfg, world))

    seq_lens = (
        set()
    )  # the sequence length of what the stages pass on (a chunk of it with sequence parallelism)
    for layer in module.forward_funcs:
        if not isinstance(layer, HeadPipe):
            layer.register_forward_hook(lambda _m, _args, out: seq_lens.add(out[0].shape[1]))
    grads = {}
    for name, p in module.named_parameters():
        p.register_post_accumulate_grad_hook(
            lambda p, name=name: grads.__setitem__(name, p.grad.detach().clone())
        )
    teacher_before = [q.detach().clone() for piece in pipe_teacher.pieces for q in piece.parameters()]
    teacher_requires_grad = any(q.requires_grad for piece in pipe_teacher.pieces for q in piece.parameters())
    ids, mask, types, labels = _batch(family)
    losses, teacher_losses, calls = [], [], []
    for step, alpha in enumerate(alphas):
        loss_fn.alpha = alpha
        if alpha == 0.0 and pipe_teacher.active:
            pipe_teacher.release()
        losses.append(engine.train_batch(iter([((ids, mask, types), labels)])).item())
        records = loss_fn.pop_records()
        teacher_losses.append(
            records[0].teacher_lm_loss.item() if records and records[0].teacher_lm_loss is not None else None
        )
        calls.append(loss_fn.teacher_forward_calls)
        if step == 0:
            first_grads = dict(grads)
            teacher_after = [q.detach().clone() for piece in pipe_teacher.pieces for q in piece.parameters()]
    info = partition_info(module)
    named = {_full_name(name, student_cfg.num_layers): (g, info.get(name)) for name, g in first_grads.items()}
    return {
        "losses": losses,
        "teacher_losses": teacher_losses,
        "teacher_calls": calls,
        "grads": named,
        "teacher_unchanged": all(torch.equal(a, b) for a, b in zip(teacher_before, teacher_after)),
        "teacher_requires_grad": teacher_requires_grad,
        "state_keys": list(module.state_dict().keys()),
        "tp_rank": groups.tp_rank,
        "pp_rank": groups.pp_rank,
        "parts": [int(x) for x in module.parts],
        "seq_lens": seq_lens,
    }


def _assemble(results):
    """Full gradients from every rank's pieces: TP shards joined per stage, the tied embedding's two pipeline
    copies (first and last stage) summed, as the embedding group's all-reduce does."""
    per_stage: dict[tuple[str, int], dict[int, tuple]] = {}
    for res in results:
        for name, (g, info) in res["grads"].items():
            tied = name.replace("head.word_embeddings.weight", "embedding.word_embeddings.weight")
            per_stage.setdefault((tied, res["pp_rank"]), {})[res["tp_rank"]] = (g, info)
    out: dict[str, torch.Tensor] = {}
    for (name, _), shards in per_stage.items():
        ordered = [shards[r] for r in sorted(shards)]
        info = ordered[0][1]
        full = ordered[0][0] if info is None else unshard_rows([g for g, _ in ordered], info[1], dim=info[0])
        out[name] = out[name] + full if name in out else full
    return out


@pytest.mark.distributed
@pytest.mark.parametrize(
    "world,tp,pp,family,partition,fused,sp",
    [
        (2, 1, 2, "gpt2", "parameters", False, False),
        (2, 1, 2, "roberta", "parameters", False, False),
        (4, 2, 2, "gpt2", "parameters", False, False),
        (2, 1, 2, "gpt2", "compute", False, False),
        (2, 1, 2, "roberta", "parameters", True, False),
        (4, 2, 2, "gpt2", "parameters", True, True),
        (4, 2, 2, "roberta", "parameters", False, True),
        pytest.param(8, 4, 2, "gpt2", "parameters", True, True, marks=pytest.mark.slow),
    ],
)
def test_teacher_in_pipeline_stages(world, tp, pp, family, partition, fused, sp):
    """Any split of the layers over the stages (DeepSpeed's by parameters, or by compute, where the head
    and the teacher's work weigh in) gives the single-process loss and gradients; so does the last stage
    handing the loss the heads' inputs (``fused``: the chunked fused head + loss) instead of logits, and
    sequence parallelism (``sp``: student and teacher send their sequence chunks between the stages)."""
    ref_loss, ref_teacher_loss, ref_grads = _reference(family)
    alphas = [ALPHA, ALPHA, 0.0, 0.0]
    results = run_distributed(_pipe_worker, world, args=(tp, pp, family, alphas, partition, fused, sp))
    if partition == "compute":  # the head (with the teacher's head and the KL) gets a stage to itself
        student_cfg, _ = _configs(family)
        assert results[0]["parts"] == [0, student_cfg.num_layers + 1, student_cfg.num_layers + 2]
    for res in results:
        assert res["seq_lens"] in ({SEQ // tp if sp else SEQ}, set())  # set(): a stage with the head alone
        assert res["losses"][0] == pytest.approx(ref_loss, rel=1e-5)
        assert res["losses"][2] != pytest.approx(res["losses"][1])
        assert not res["teacher_requires_grad"]
        assert res["teacher_unchanged"]
        assert not any("pipe_teacher" in k for k in res["state_keys"])
        # the teacher runs while alpha > 0 and never after it is released
        assert res["teacher_calls"][1] == res["teacher_calls"][2] == res["teacher_calls"][3]
    last = [r for r in results if r["teacher_calls"][0] > 0]
    assert last, "the last stage ran the teacher"
    assert last[0]["teacher_losses"][0] == pytest.approx(ref_teacher_loss, rel=1e-5)
    assert last[0]["teacher_losses"][2] is None
    grads = _assemble(results)
    assert set(grads) == set(ref_grads)
    for name, ref in ref_grads.items():
        torch.testing.assert_close(grads[name], ref, rtol=1e-4, atol=2e-6, msg=name)


def test_teacher_layers_are_proportional():
    assert teacher_layers_for(4, 2) == [[0], [], [1], []]
    assert teacher_layers_for(2, 6) == [[0, 1, 2], [3, 4, 5]]
    assert teacher_layers_for(3, 3) == [[0], [1], [2]]
    flat = [j for part in teacher_layers_for(12, 9) for j in part]
    assert flat == list(range(9))
