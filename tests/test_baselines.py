"""Tests of the fine-tuning baselines: worked examples of the losses (docs/algorithm.md, "The baselines"),
directions, training, DDP."""
from __future__ import annotations

import copy
import math
import warnings

import lightning as L
import pytest
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader
from transformers import LlamaConfig, LlamaForCausalLM

from baselines.data import PairedUnlearningDataset, collate_paired, pair_indices
from baselines.losses import (
    FORGET_TERMS,
    REGULARISERS,
    LossContext,
    ap_from_nll,
    npo_from_nll,
    objective,
    sequence_nll,
    token_mean_ce,
)
from baselines.module import UnlearningModule, needs_reference, required_parts
from unierase.token import refusal_for

# A pytest_configure hook in a test module is never called (only conftest/plugins hooks are), so the
# marker cannot be registered here; -m "slow" / -m "not slow" select it all the same.
with warnings.catch_warnings():
    warnings.simplefilter("ignore", pytest.PytestUnknownMarkWarning)
    slow = pytest.mark.slow


# ------------------------------------------------------------ hand-made logits
def nll_logits(rows: list[list[float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """V=2 logits/labels whose supervised per-token NLLs are exactly ``rows``.

    Position 0 is the unsupervised prompt; the target is token 0 with p = exp(−nll).
    """
    n = len(rows[0])
    logits = torch.zeros(len(rows), n + 1, 2, dtype=torch.float64)
    labels = torch.full((len(rows), n + 1), -100)
    for b, row in enumerate(rows):
        p = torch.exp(-torch.tensor(row, dtype=torch.float64))
        logits[b, :n] = torch.stack([p.log(), (1 - p).log()], dim=-1)  # log-probs are valid logits
        labels[b, 1:] = 0
    return logits, labels


def ctx_of(**parts: tuple[torch.Tensor, torch.Tensor]) -> LossContext:
    return LossContext({k: v[0] for k, v in parts.items()}, {k: v[1] for k, v in parts.items()})


def test_primitives():
    logits, labels = nll_logits([[1.0, 2.0, 3.0], [0.5, 0.5, 0.5]])
    labels[1, 1] = -100  # second example supervises only two positions
    assert torch.allclose(sequence_nll(logits, labels), torch.tensor([6.0, 1.0], dtype=torch.float64))
    assert token_mean_ce(logits, labels).item() == pytest.approx(7.0 / 5)
    ref = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 2), labels[:, 1:].reshape(-1))
    assert token_mean_ce(logits, labels).item() == pytest.approx(ref.item())  # HF causal-LM loss


# ------------------------------------------------------ worked examples
def test_npo_worked_examples():
    theta, ref = nll_logits([[3.0, 3.0, 3.0, 3.0]]), nll_logits([[2.5, 2.5, 2.5, 2.5]])
    ctx = ctx_of(forget=theta)
    ctx.ref_logits = {"forget": ref[0]}
    assert FORGET_TERMS["npo"](ctx).item() == pytest.approx(11.9628, abs=1e-4)
    ctx.ref_logits = {"forget": theta[0]}
    assert FORGET_TERMS["npo"](ctx).item() == pytest.approx(20 * math.log(2), abs=1e-4)  # 13.8629


def test_dpo_worked_examples():
    ctx = ctx_of(forget=nll_logits([[5.0, 5.0]]), forget_idk=nll_logits([[10.0, 10.0]]))
    ctx.ref_logits = {"forget": nll_logits([[4.0, 4.0]])[0], "forget_idk": nll_logits([[12.5, 12.5]])[0]}
    assert FORGET_TERMS["dpo"](ctx).item() == pytest.approx(8.0637, abs=1e-4)
    ctx.ref_logits = dict(ctx.logits)
    assert FORGET_TERMS["dpo"](ctx).item() == pytest.approx(13.8629, abs=1e-4)


def test_me_worked_example():
    logits = torch.tensor([[[0.9, 0.1], [0.3, 0.7]]]).log()  # the last position has no next token
    labels = torch.tensor([[-100, 1]])
    assert FORGET_TERMS["me"](ctx_of(forget=(logits, labels))).item() == pytest.approx(0.5108, abs=1e-4)


def test_kl_worked_example_and_padding_in_denominator():
    theta = torch.tensor([[[0.9, 0.1]]]).log()
    ctx = ctx_of(retain=(theta, torch.tensor([[-100]])))
    ctx.ref_logits = {"retain": torch.zeros(1, 1, 2)}
    assert REGULARISERS["kl"](ctx).item() == pytest.approx(0.5108, abs=1e-4)
    # a second, identical (padding) position halves the average: all B·T positions count
    ctx = ctx_of(retain=(torch.cat([theta, torch.zeros(1, 1, 2)], 1), torch.full((1, 2), -100)))
    ctx.ref_logits = {"retain": torch.zeros(1, 2, 2)}
    assert REGULARISERS["kl"](ctx).item() == pytest.approx(0.5108 / 2, abs=1e-4)


def test_ap_simnpo_ga_worked_examples():
    ctx = ctx_of(retain=nll_logits([[5.0, 5.0]]), retain_idk=nll_logits([[15.0, 15.0]]))
    assert REGULARISERS["ap"](ctx).item() == pytest.approx(1.2693, abs=1e-4)
    ctx = ctx_of(forget=nll_logits([[0.1, 0.3]]))
    ctx.simnpo_beta, ctx.simnpo_delta = 2.5, 0.0
    assert FORGET_TERMS["simnpo"](ctx).item() == pytest.approx(0.3793, abs=1e-4)
    assert FORGET_TERMS["ga"](ctx_of(forget=nll_logits([[1.0, 3.0], [2.0, 2.0]]))).item() == pytest.approx(-2.0)


def test_combined_npo_gd_worked_example():
    ctx = ctx_of(forget=nll_logits([[6.0, 6.0]]), retain=nll_logits([[1.0, 2.0]]))
    ctx.ref_logits = {"forget": nll_logits([[5.0, 5.0]])[0]}
    loss, loss_f, loss_r = objective(FORGET_TERMS["npo"], REGULARISERS["gd"], ctx)
    assert (loss.item(), loss_f.item(), loss_r.item()) == pytest.approx((13.4628, 11.9628, 1.5), abs=1e-4)
    loss, _, loss_r = objective(FORGET_TERMS["npo"], None, ctx)
    assert loss.item() == pytest.approx(11.9628, abs=1e-4) and loss_r.item() == 0.0


# ------------------------------------------------------------------ directions
def test_ga_gradient_raises_forget_nll():
    logits, labels = nll_logits([[1.0, 2.0]])
    logits = logits.requires_grad_()
    FORGET_TERMS["ga"](ctx_of(forget=(logits, labels))).backward()
    after = sequence_nll(logits.detach() - 0.1 * logits.grad, labels)
    assert after.item() > sequence_nll(logits.detach(), labels).item()


def test_npo_is_bounded_and_decreasing_in_nll():
    ref = torch.tensor([10.0])
    values = [npo_from_nll(torch.tensor([x]), ref, 0.1).item() for x in (0.0, 10.0, 100.0, 1e3, 1e5)]
    assert all(a > b >= 0 for a, b in zip(values, values[1:]))
    assert values[-1] == pytest.approx(0.0, abs=1e-6)  # → 0 as NLL_θ → ∞: bounded, unlike GA


def test_me_is_zero_at_uniform_and_positive_otherwise():
    labels = torch.tensor([[-100, 3, 5, 7]])
    assert FORGET_TERMS["me"](ctx_of(forget=(torch.zeros(1, 4, 8), labels))).item() == pytest.approx(0, abs=1e-6)
    assert FORGET_TERMS["me"](ctx_of(forget=(torch.randn(1, 4, 8), labels))).item() > 0


def test_kl_is_zero_when_model_equals_reference():
    logits = torch.randn(2, 5, 8)
    ctx = ctx_of(retain=(logits, torch.full((2, 5), -100)))
    ctx.ref_logits = {"retain": logits.clone()}
    assert REGULARISERS["kl"](ctx).item() == pytest.approx(0, abs=1e-6)


def test_ap_prefers_retain_answer_over_refusal():
    good, bad = ap_from_nll(torch.tensor([50.0]), torch.tensor([5.0]), 0.1), ap_from_nll(
        torch.tensor([5.0]), torch.tensor([50.0]), 0.1)
    assert good < 1.0 < bad


# -------------------------------------------------------------- data pairing
def test_pairing_matches_global_seed_draws():
    for i in (0, 7, 399):
        with torch.random.fork_rng():
            torch.manual_seed(i)  # closer-look's way
            j = (i + torch.randint(0, 3600, (1,)).item()) % 3600
            k = torch.randint(0, 100, (1,)).item()
        assert pair_indices(i, 3600, 100) == (j, k)


# ------------------------------------------------- tiny model and training
VOCAB, BOS, EOS, MAX_LEN = 64, 1, 2, 16


def encode(question: str, answer: str) -> dict[str, torch.Tensor]:
    """Texts are space-separated token ids; answer-only labels plus one EOS, EOS padding."""
    q, a = [BOS] + [int(w) for w in question.split()], [int(w) for w in answer.split()]
    ids = (q + a + [EOS] * MAX_LEN)[:MAX_LEN]
    n = len(q) + len(a)
    labels = torch.full((MAX_LEN,), -100)
    labels[len(q):n + 1] = torch.tensor(ids[len(q):n + 1])
    return {"input_ids": torch.tensor(ids), "attention_mask": (torch.arange(MAX_LEN) < n).long(), "labels": labels}


def random_texts(g: torch.Generator, n: int, length: int) -> list[str]:
    return [" ".join(map(str, torch.randint(3, VOCAB, (length,), generator=g).tolist())) for _ in range(n)]


@pytest.fixture(scope="module")
def setup():
    g = torch.Generator().manual_seed(0)
    forget = list(zip(random_texts(g, 16, 4), random_texts(g, 16, 5)))
    retain = list(zip(random_texts(g, 16, 4), random_texts(g, 16, 5)))
    refusals = random_texts(g, 4, 5)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg)
    # memorise forget and retain answers first, so that unlearning has something to remove
    batch = collate_paired([{"x": encode(*qa)} for qa in forget + retain])["x"]
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60):
        opt.zero_grad()
        model(**batch).loss.backward()
        opt.step()
    return model.eval(), PairedUnlearningDataset(forget, retain, refusals, encode)


def mean_nll(model: torch.nn.Module, ds: PairedUnlearningDataset, part: str) -> float:
    batch = collate_paired([ds[i] for i in range(len(ds))])[part]
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return sequence_nll(logits, batch["labels"]).mean().item()


def trainer(max_steps: int, **kw) -> L.Trainer:
    return L.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, **kw)


def fit(setup, forget: str, regulariser: str | None, steps: int = 10, lr: float = 1e-2, **kw):
    base, ds = setup
    L.seed_everything(0, verbose=False)
    model = copy.deepcopy(base)
    ref = copy.deepcopy(base) if needs_reference(forget, regulariser) else None
    module = UnlearningModule(model, ref, forget=forget, regulariser=regulariser, lr=lr, max_steps=steps, **kw)
    loader = DataLoader(ds, batch_size=8, collate_fn=collate_paired)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*(num_workers|does not have many workers|in eval mode).*")
        trainer(steps).fit(module, loader)
    return module


METHODS = [("ga", "gd"), ("ga", "kl"), ("npo", "gd"), ("npo", "kl"), ("me", "gd"), ("dpo", "gd"),
           ("dpo", "kl"), ("idk", "ap"), ("ga", None), ("npo", None), ("idk", None), ("simnpo", None)]


@pytest.mark.parametrize("forget,regulariser", METHODS, ids=[f"{f}_{r}" if r else f for f, r in METHODS])
def test_training_moves_forget_nll_in_intended_direction(setup, forget, regulariser):
    base, ds = setup
    part = "forget_idk" if forget == "idk" else "forget"  # IDK: the refusal NLL must fall
    before = mean_nll(base, ds, part)
    module = fit(setup, forget, regulariser)
    after = mean_nll(module.model, ds, part)
    assert (after < before - 1.0) if forget == "idk" else (after > before + 1.0), (before, after)
    assert module.trainer.global_step == 10
    assert {"train/loss", "train/forget_loss", "train/reg_loss"} <= set(module.trainer.callback_metrics)


@pytest.mark.parametrize("forget,regulariser", [("ga", "gd"), ("ga", "kl"), ("npo", "gd"), ("idk", "ap")])
def test_regulariser_protects_retain_answers(setup, forget, regulariser):
    _, ds = setup
    with_reg, without = fit(setup, forget, regulariser), fit(setup, forget, None)
    assert mean_nll(with_reg.model, ds, "retain") < mean_nll(without.model, ds, "retain")


def test_reference_model_frozen_and_unchanged(setup):
    base, _ = setup
    module = fit(setup, "npo", "kl", steps=3)
    ref = module.ref_model
    assert not ref.training and not any(p.requires_grad for p in ref.parameters())
    assert all(torch.equal(a, b) for a, b in zip(ref.state_dict().values(), base.state_dict().values()))
    assert not all(torch.equal(a, b) for a, b in zip(module.model.state_dict().values(),
                                                     base.state_dict().values()))


def test_registry_and_reference_requirements(setup):
    assert set(FORGET_TERMS) == {"ga", "npo", "dpo", "me", "idk", "simnpo"}
    assert set(REGULARISERS) == {"gd", "kl", "ap"}
    assert not needs_reference("ga", "gd") and not needs_reference("idk", "ap") and not needs_reference("simnpo", None)
    assert needs_reference("npo", None) and needs_reference("dpo", "gd") and needs_reference("ga", "kl")
    assert required_parts("dpo", "kl") == ("forget", "forget_idk", "retain")
    assert required_parts("idk", "ap") == ("forget_idk", "retain", "retain_idk")
    with pytest.raises(ValueError, match="reference"):
        UnlearningModule(setup[0], None, forget="npo")
    with pytest.raises(ValueError, match="unknown"):
        needs_reference("ga_gd", None)  # composite names are not parsed


def test_dataset_items_and_assignment(setup):
    _, ds = setup
    item, (j, k) = ds[3], pair_indices(3, len(ds.retain), len(ds.refusals))
    assert set(item) == {"forget", "retain", "forget_idk", "retain_idk"}
    assert torch.equal(item["retain"]["input_ids"], encode(*ds.retain[j])["input_ids"])
    assert torch.equal(item["retain_idk"]["input_ids"], encode(ds.retain[j][0], ds.refusals[k])["input_ids"])
    hashed = PairedUnlearningDataset(ds.forget, ds.retain, ds.refusals, encode, "stable_hash", parts=["forget_idk"])
    assert set(hashed[3]) == {"forget_idk"}
    c = refusal_for(ds.forget[3][0], ds.refusals)
    assert torch.equal(hashed[3]["forget_idk"]["labels"], encode(ds.forget[3][0], c)["labels"])
    batch = collate_paired([ds[0], ds[1]])
    assert batch["forget"]["input_ids"].shape == (2, MAX_LEN)


def test_lr_schedule_warmup_then_decay(setup):
    module = UnlearningModule(copy.deepcopy(setup[0]), forget="ga", lr=1.0, warmup_steps=2, max_steps=6)
    sched = module.configure_optimizers()["lr_scheduler"]["scheduler"]
    lrs = []
    for _ in range(7):
        lrs.append(sched.get_last_lr()[0])
        sched.optimizer.step()
        sched.step()
    assert lrs == pytest.approx([0.0, 0.5, 1.0, 0.75, 0.5, 0.25, 0.0])


# ------------------------------------------------------------------------ DDP
class LossRecorder(L.Callback):
    """Writes each rank's per-step loss to a file (ddp_spawn workers cannot return callback state)."""

    def __init__(self, path):
        self.path = path

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        with open(f"{self.path}.{trainer.global_rank}", "a") as f:
            f.write(f"{outputs['loss'].item()}\n")


class InOrderShard(torch.utils.data.Sampler):
    """Items rank, rank+world, ... in order; Lightning's injected DistributedSampler always shuffles."""

    def __init__(self, n: int):
        self.n = n

    def _shard(self) -> range:
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        return range(rank, self.n, world)

    def __iter__(self):
        return iter(self._shard())

    def __len__(self) -> int:
        return len(self._shard())


@slow
def test_ddp_two_process_cpu_matches_single_process(setup, tmp_path):
    base, ds = setup
    curves = {}
    for name, devices, batch_size in (("single", 1, 8), ("ddp", 2, 4)):
        L.seed_everything(0, verbose=False)
        module = UnlearningModule(copy.deepcopy(base), forget="ga", regulariser="gd", lr=1e-2, max_steps=6)
        loader = DataLoader(ds, batch_size=batch_size, sampler=InOrderShard(len(ds)), collate_fn=collate_paired)
        kw = {"strategy": "ddp_spawn", "devices": 2, "use_distributed_sampler": False} if devices == 2 else {}
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", ".*(num_workers|does not have many workers).*")
            trainer(6, callbacks=[LossRecorder(tmp_path / name)], **kw).fit(module, loader)
        files = [tmp_path / f"{name}.{r}" for r in range(devices)]
        per_rank = torch.tensor([[float(x) for x in f.read_text().split()] for f in files])
        curves[name] = per_rank.mean(0)  # equal token counts per rank: mean of rank losses = global loss
    assert len(curves["ddp"]) == len(curves["single"]) == 6
    assert curves["ddp"][-1] < curves["ddp"][0] and curves["single"][-1] < curves["single"][0]
    # each DDP step sees the single-process batch split in two, so the averaged curves coincide
    assert torch.allclose(curves["ddp"], curves["single"], rtol=1e-3, atol=1e-3), curves
