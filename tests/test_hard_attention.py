"""Hard attention (Xu et al. 2015, Sec. 4.1): the REINFORCE estimator against the exact
gradient of the bound L_s on a toy small enough to enumerate every location sequence,
the baseline, the entropy term, masks, and the model/trainer/checkpoint/CLI around it."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
from pathlib import Path

import pytest
import torch

from caption_lib import cli
from caption_lib.data import load_dataset, split_records
from caption_lib.decoder import DecoderWithAttention, caption_loss
from caption_lib.errors import CaptionLibError
from caption_lib.evaluate import evaluate
from caption_lib.hard_attention import (
    HardAttentionDecoder,
    caption_log_likelihood,
    gradient_stats,
    hard_attention_loss,
    pick,
    reinforce_loss,
    update_baseline,
)
from caption_lib.model import Captioner, CaptionerConfig
from caption_lib.train import run_dir_for, train
from caption_lib.vocab import Vocabulary
from conftest import tiny_configs

HARD_FIELDS = ("attention", "lambda_r", "lambda_e", "baseline_decay", "expected_prob",
               "test_context")

P, E, V = 3, 4, 6  # regions, feature size, vocabulary of the toy


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads only cost here
    yield
    torch.set_num_threads(threads)


def _toy(seed: int = 0, expected_prob: float = 0.0):
    """A decoder whose words depend on where it looks (weights x3, distinct regions)."""
    torch.manual_seed(seed)
    decoder = HardAttentionDecoder(V, encoder_dim=E, embed_dim=4, decoder_dim=5,
                                   attention_dim=4, dropout=0.0, expected_prob=expected_prob)
    with torch.no_grad():
        for p in decoder.parameters():
            p.mul_(3.0)
    features = torch.randn(1, P, E) * 2  # (1, P, E)
    captions = torch.tensor([[1, 4, 5, 2]])  # <start> w w <end>: T = 3 steps, 3 words
    return decoder, features, captions, torch.tensor([4])


def _enumerate(decoder, features, captions, lengths):
    """Every location sequence s (P^T of them): p(s | a) and R(s) = log p(y | s, a)."""
    steps = captions.size(1) - 1
    seqs = torch.tensor(list(itertools.product(range(P), repeat=steps)))  # (S, T)
    S = len(seqs)
    out = decoder(features.expand(S, -1, -1), captions.expand(S, -1), lengths.expand(S),
                  sample=True, locations=seqs)
    reward = caption_log_likelihood(out.logits, captions.expand(S, -1), lengths.expand(S))
    return out.log_p_s.exp(), reward  # (S,), (S,)


def _exact_loss_gradient(decoder, features, captions, lengths):
    """-grad L_s / words: what the estimator's loss gradient should average to."""
    prob, reward = _enumerate(decoder, features, captions, lengths)
    bound = (prob * reward).sum()  # L_s, differentiable through p(s | a) and R(s)
    grads = torch.autograd.grad(bound, list(decoder.parameters()))
    words = float(lengths.sum() - len(lengths))
    return -torch.cat([g.reshape(-1) for g in grads]).double() / words


def _z(stats, exact):
    """Standardised errors of the sampled mean (floor: float32 noise of the exact one)."""
    floor = 1e-5 * exact.abs().max()
    return (stats.mean.double() - exact) / (stats.stderr.double() ** 2 + floor ** 2).sqrt()


def _batch(features, captions, lengths, n=32):
    return features.expand(n, -1, -1), captions.expand(n, -1), lengths.expand(n)


def test_the_bound_is_below_the_log_likelihood():
    decoder, features, captions, lengths = _toy()
    with torch.no_grad():
        prob, reward = _enumerate(decoder, features, captions, lengths)
    assert abs(float(prob.sum()) - 1) < 1e-5  # p(s | a) is a distribution over sequences
    bound = float((prob * reward).sum())
    log_likelihood = float(torch.logsumexp(prob.log() + reward, dim=0))  # log p(y | a)
    assert bound < log_likelihood  # Jensen: L_s <= log p(y | a)
    assert float(reward.max() - reward.min()) > 0.1, "the toy's words must depend on s"


@pytest.mark.parametrize("baseline", [0.0, "exact"])
def test_reinforce_mean_matches_the_exact_gradient(baseline):
    decoder, features, captions, lengths = _toy()
    exact = _exact_loss_gradient(decoder, features, captions, lengths)
    if baseline == "exact":  # any b that does not depend on the sample: same mean
        with torch.no_grad():
            prob, reward = _enumerate(decoder, features, captions, lengths)
        baseline = float((prob * reward).sum())
    stats = gradient_stats(decoder, *_batch(features, captions, lengths), samples=200,
                           baseline=baseline, generator=torch.Generator().manual_seed(1))
    z = _z(stats, exact)
    assert float(z.abs().max()) < 5 and float((z ** 2).mean()) < 3, (z.abs().max(), (z ** 2).mean())


def test_without_the_reinforce_term_the_test_above_fails():
    """The check has power: the likelihood term alone misses the attention's gradient."""
    decoder, features, captions, lengths = _toy()
    exact = _exact_loss_gradient(decoder, features, captions, lengths)
    stats = gradient_stats(decoder, *_batch(features, captions, lengths), samples=50,
                           baseline=0.0, lambda_r=0.0, generator=torch.Generator().manual_seed(1))
    assert float(_z(stats, exact).abs().max()) > 100


def test_moving_average_baseline_lowers_the_variance_and_keeps_the_mean():
    decoder, features, captions, lengths = _toy()
    exact = _exact_loss_gradient(decoder, features, captions, lengths)
    batch = _batch(features, captions, lengths)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():  # warm the moving average up from b_0 = 0, as training does
        for _ in range(60):
            out = decoder(*batch, sample=True, generator=g)
            update_baseline(decoder.baseline, caption_log_likelihood(out.logits, *batch[1:]),
                            out.sampled, decay=0.9)
    plain = gradient_stats(decoder, *batch, samples=200, baseline=0.0, generator=g)
    moving = gradient_stats(decoder, *batch, samples=200, baseline=None, decay=0.9, generator=g)
    assert moving.variance < 0.05 * plain.variance, (moving.variance, plain.variance)
    for stats in (plain, moving):
        z = _z(stats, exact)
        assert float(z.abs().max()) < 5 and float((z ** 2).mean()) < 3


def test_training_loss_uses_the_old_baseline_then_moves_it():
    decoder, features, captions, lengths = _toy(expected_prob=0.5)
    decoder.train()
    features, captions, lengths = _batch(features, captions, lengths, n=64)
    decoder.baseline.fill_(-2.0)
    torch.manual_seed(5)
    _, parts = hard_attention_loss(decoder, features, captions, lengths, lambda_r=1.0,
                                   lambda_e=0.0, alpha_c=0.0, baseline_decay=0.9)
    assert parts["baseline"] == -2.0 and 0 < parts["sampled"] < 64
    expected = 0.9 * -2.0 + 0.1 * parts["reward"]  # b_k = 0.9 b_(k-1) + 0.1 mean R
    assert abs(float(decoder.baseline) - expected) < 1e-5
    decoder.eval()  # evaluation: the test-time context's loss, nothing moves
    hard_attention_loss(decoder, features, captions, lengths, lambda_r=1.0, lambda_e=0.0,
                        alpha_c=0.0, baseline_decay=0.9)
    assert abs(float(decoder.baseline) - expected) < 1e-5


def test_entropy_term_gradient_equals_autograd_on_the_closed_form():
    torch.manual_seed(3)
    decoder = HardAttentionDecoder(V, encoder_dim=E, embed_dim=4, decoder_dim=5,
                                   attention_dim=4, dropout=0.0, expected_prob=0.0)
    features, captions = torch.randn(4, P, E), torch.randint(3, V, (4, 5))
    lengths = torch.full((4,), 5)
    out = decoder(features, captions, lengths, sample=True,
                  generator=torch.Generator().manual_seed(4))
    with_term = reinforce_loss(out, captions, lengths, 0.0, lambda_r=0.0, lambda_e=0.3)[0]
    without = reinforce_loss(out, captions, lengths, 0.0, lambda_r=0.0, lambda_e=0.0)[0]
    params = list(decoder.parameters())
    got = torch.autograd.grad(with_term - without, params, allow_unused=True)
    # the closed form, written out: H[s~] = sum_t -sum_i alpha_ti log alpha_ti on the same path
    forced = decoder(features, captions, lengths, sample=True, locations=out.locations)
    closed = -(forced.alphas * forced.alphas.log()).sum()  # over b, t, i
    want = torch.autograd.grad(-0.3 * closed / 16.0, params, allow_unused=True)  # 16 words
    for g, w in zip(got, want):
        g = torch.zeros(()) if g is None else g
        w = torch.zeros(()) if w is None else w
        assert torch.allclose(g, w, atol=1e-6), (g, w)
    assert any(w is not None and w.abs().sum() > 0 for w in want)


def test_sampling_respects_region_and_step_masks():
    torch.manual_seed(6)
    decoder = HardAttentionDecoder(V, encoder_dim=E, embed_dim=4, decoder_dim=5,
                                   attention_dim=4, dropout=0.0, expected_prob=0.0)
    B, regions = 5, 6
    features = torch.randn(B, regions, E, requires_grad=True)
    region_mask = torch.rand(B, regions) < 0.5
    region_mask[:, 0] = True  # every image keeps a region
    captions = torch.randint(3, V, (B, 7))
    lengths = torch.tensor([7, 3, 5, 2, 6])
    steps = torch.arange(6).unsqueeze(0)  # (1, T)
    real = steps < (lengths - 1).unsqueeze(1)  # (B, T)
    for seed in range(20):
        out = decoder(features, captions, lengths, sample=True, region_mask=region_mask,
                      generator=torch.Generator().manual_seed(seed))
        where = out.locations
        assert bool((where[~real] == -1).all()) and bool((where[real] >= 0).all())
        rows = real.nonzero()
        assert bool(region_mask[rows[:, 0], where[real]].all()), "a masked region was drawn"
        assert float(out.alphas.detach().masked_select(~region_mask.unsqueeze(1)).abs().sum()) == 0
        chosen = out.alphas.gather(2, where.clamp_min(0).unsqueeze(2)).squeeze(2)  # (B, T)
        manual = torch.where(real, chosen.log(), 0.0).sum(dim=1)  # only the real steps
        assert torch.allclose(out.log_p_s, manual, atol=1e-5)
    loss = reinforce_loss(out, captions, lengths, 0.0, lambda_r=1.0, lambda_e=0.1)[0]
    loss.backward()
    assert torch.isfinite(features.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in decoder.parameters() if p.grad is not None)


@pytest.mark.parametrize("deep_output", [False, True])
def test_expected_context_captions_train_exactly_like_soft_attention(deep_output):
    torch.manual_seed(7)
    hard = HardAttentionDecoder(V, encoder_dim=E, embed_dim=4, decoder_dim=5,
                                attention_dim=4, dropout=0.0, expected_prob=1.0,
                                deep_output=deep_output)
    soft = DecoderWithAttention(V, encoder_dim=E, embed_dim=4, decoder_dim=5,
                                attention_dim=4, dropout=0.0, deep_output=deep_output)
    soft.load_state_dict({k: v for k, v in hard.state_dict().items() if k != "baseline"})
    features, captions = torch.randn(3, P, E), torch.randint(3, V, (3, 6))
    lengths = torch.tensor([6, 4, 5])
    out = hard(features, captions, lengths, sample=True)
    assert not bool(out.sampled.any())
    loss_h = reinforce_loss(out, captions, lengths, -3.0, lambda_r=1.0, lambda_e=0.5)[0]
    logits, alphas = soft(features, captions, lengths)
    loss_s = caption_loss(logits, captions, lengths, alphas, alpha_c=0.0)[0]
    assert torch.allclose(loss_h, loss_s, atol=1e-6)
    hard.expected_prob = 0.5
    draws = hard(features.repeat(400, 1, 1), captions.repeat(400, 1), lengths.repeat(400),
                 sample=True, generator=torch.Generator().manual_seed(8)).sampled
    assert abs(float(draws.float().mean()) - 0.5) < 0.05  # 1200 captions, sd 0.014


def test_test_time_contexts():
    torch.manual_seed(9)
    hard = HardAttentionDecoder(V, encoder_dim=E, embed_dim=4, decoder_dim=5,
                                attention_dim=4, dropout=0.0).eval()
    soft = DecoderWithAttention(V, encoder_dim=E, embed_dim=4, decoder_dim=5,
                                attention_dim=4, dropout=0.0).eval()
    soft.load_state_dict({k: v for k, v in hard.state_dict().items() if k != "baseline"})
    features, tokens = torch.randn(4, P, E), torch.tensor([1, 3, 4, 5])
    state = hard.init_state(features)
    with torch.no_grad():
        expected = hard.step(tokens, state, features)[0]
        assert torch.allclose(expected, soft.step(tokens, state, features)[0])
        hard.test_context = "argmax"
        argmax_logits, _, alpha = hard.step(tokens, state, features)
        loop = hard.prepare()
        _, gate, from_h = hard.read(loop, state[0])
        h = hard.write(loop, hard.input_gates(loop, hard.embedding(tokens)), from_h,
                       gate * pick(features, alpha.argmax(dim=1)), state[1])[0]
        assert torch.allclose(argmax_logits, hard.fc(h))
        hard.test_context = "sample"
        draws = {tuple(hard.step(tokens, state, features)[0].argmax(1).tolist())
                 for _ in range(30)}
        assert len(draws) >= 1  # runs; a drawn region each time
        hard.test_context = "expected"


@pytest.mark.parametrize("field, value", [
    ("attention", "medium"), ("lambda_r", -1.0), ("lambda_e", float("nan")),
    ("baseline_decay", 1.0), ("expected_prob", 1.5), ("test_context", "mode")])
def test_config_validation_is_one_clear_line(field, value):
    with pytest.raises(CaptionLibError, match=field) as err:
        CaptionerConfig(**{"attention": "hard", field: value})
    assert "\n" not in str(err.value)


def test_hard_needs_attention_and_soft_run_folders_stay():
    with pytest.raises(CaptionLibError, match="use_attention"):
        CaptionerConfig(attention="hard", use_attention=False)
    soft, config = tiny_configs()
    soft = dataclasses.replace(soft, deep_output=False)  # one output layer, as before
    # a soft run keeps the folder it had before the hard-attention fields and the deep
    # output existed (and before TrainConfig's restval, best_by and encoder_epochs, at
    # their defaults; ema_decay, at 0, and references, at "random", too)
    old = {k: v for k, v in dataclasses.asdict(soft).items()
           if k not in HARD_FIELDS and k != "deep_output"}
    key = json.dumps([str(Path("d").resolve()), {**old, "max_len": 20},
                      {k: v for k, v in dataclasses.asdict(config).items()
                       if k not in ("restval", "best_by", "encoder_epochs", "ema_decay",
                                    "references")}],
                     sort_keys=True)
    assert run_dir_for("d", soft, config).name == f"d-{hashlib.sha256(key.encode()).hexdigest()[:10]}"
    hard = dataclasses.replace(soft, attention="hard")
    assert run_dir_for("d", soft, config) != run_dir_for("d", hard, config)
    assert run_dir_for("d", hard, config) != run_dir_for(
        "d", dataclasses.replace(hard, lambda_e=0.0), config)


def _tiny_model(attention="hard"):
    vocab = Vocabulary.build(["a red circle", "a blue square left of a red circle"], min_freq=1)
    config, _ = tiny_configs(attention=attention)
    return Captioner(vocab, config)


def test_save_load_of_a_hard_model(tmp_path):
    model = _tiny_model()
    model.decoder.baseline.fill_(-4.25)
    path = model.save(tmp_path / "hard.pt")
    loaded = Captioner.load(path)
    assert isinstance(loaded.decoder, HardAttentionDecoder)
    assert loaded.config == model.config and float(loaded.decoder.baseline) == -4.25
    features = torch.randn(2, 49, 2048)
    captions, lengths = torch.tensor([[1, 4, 5, 2], [1, 6, 2, 0]]), torch.tensor([4, 3])
    model.eval(), loaded.eval()
    with torch.no_grad():
        assert torch.equal(model.decoder(features, captions, lengths)[0],
                           loaded.decoder(features, captions, lengths)[0])


def test_an_old_checkpoint_without_the_field_loads_as_soft(tmp_path):
    model = _tiny_model(attention="soft")
    path = model.save(tmp_path / "old.pt")
    payload = torch.load(path, weights_only=True)
    config = json.loads(payload["config"])
    for name in ("attention", "lambda_r", "lambda_e", "baseline_decay", "expected_prob",
                 "test_context"):
        del config[name]
    payload["config"] = json.dumps(config)
    torch.save(payload, path)
    loaded = Captioner.load(path)
    assert loaded.config.attention == "soft"
    assert type(loaded.decoder) is DecoderWithAttention


def test_a_tiny_hard_run_is_reproducible_and_resumes_exactly(tiny_shapes, tmp_path):
    def run(name, epochs, resume=False):
        model_config, config = tiny_configs(epochs=epochs, attention="hard")
        return train(tiny_shapes, tmp_path / name, None if resume else model_config, config,
                     resume=resume, progress=False, log=lambda *_: None)

    def losses(result):
        return [(h["train_loss"], h["val_loss"], h["val_bleu4"]) for h in result.history]

    straight = run("a", 2)
    assert float(straight.model.decoder.baseline) < 0  # it followed log p(y | s~, a)
    run("b", 1)
    resumed = run("b", 2, resume=True)
    # epoch 1: a second run with the same seed; epoch 2: continued from b's last.pt
    assert losses(resumed) == losses(straight)
    for a, b in zip(straight.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)  # the baseline buffer included


@pytest.mark.parametrize("context", ["expected", "argmax", "sample"])
def test_evaluate_a_hard_checkpoint(tiny_hard_checkpoint, tiny_shapes, context):
    model = Captioner.load(tiny_hard_checkpoint)
    model.decoder.test_context = context
    result = evaluate(model, tiny_shapes, "test", beam_size=2, meteor=False, progress=False)
    assert result.scores["images"] == 6 and 0 <= result.scores["semantic_f1"] <= 1
    for item in result.captions:
        assert not {"<start>", "<end>", "<pad>"} & set(item["caption"].split())


def test_caption_and_evaluate_commands_on_a_hard_checkpoint(tiny_hard_checkpoint, tiny_shapes,
                                                            tmp_path, capsys):
    image = split_records(load_dataset(tiny_shapes), "test")[0].image
    plot = tmp_path / "attention.png"
    assert cli.main(["caption", str(tiny_hard_checkpoint), str(image), "--json",
                     "--attention-plot", str(plot)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["captions"]) == 1 and plot.is_file()
    assert cli.main(["evaluate", str(tiny_hard_checkpoint), "--json", "--limit", "2",
                     "--no-meteor"]) == 0
    assert "bleu4" in json.loads(capsys.readouterr().out)


def test_a_decoder_on_a_frozen_fine_tuned_encoder(tiny_shapes, tmp_path):
    """The chapter's fair design: chapter 5's encoder, frozen, its output cached from the
    cache of its own frozen part; only the new (hard) decoder trains."""
    from caption_lib.features import cached_features
    from caption_lib.runtime import workspace_dir

    model_config, config = tiny_configs(fine_tune="layer4", epochs=1)
    source = train(tiny_shapes, tmp_path / "ft", model_config, config, progress=False,
                   log=lambda *_: None).model
    path = tmp_path / "ft" / "last.pt"
    hard = dataclasses.replace(model_config, encoder_weights=str(path), fine_tune=False,
                               attention="hard")
    result = train(tiny_shapes, tmp_path / "hard", hard, config, progress=False,
                   log=lambda *_: None)
    encoder = result.model.encoder
    assert encoder.trained_stages == () and not any(p.requires_grad for p in encoder.parameters())
    assert str(path.resolve()) in encoder.weights_used
    images = [r.image for r in split_records(load_dataset(tiny_shapes), "val")]
    store = cached_features(encoder, images, cache_root=workspace_dir() / "features",
                            progress=False)
    assert store.meta.get("from"), "derived from the layer3 cache, not from the images"
    source.eval()
    with torch.no_grad():
        want = source.encode_cached(cached_features(source.encoder, images, progress=False,
                                                    cache_root=workspace_dir() / "features")[:2])
    got = result.model.encode_cached(store[:2])  # (2, 49, 2048)
    assert torch.allclose(got, want, atol=0.05 * float(want.abs().max()))
    loaded = Captioner.load(tmp_path / "hard" / "last.pt")
    assert loaded.encoder.weights_used == encoder.weights_used
    source.save(path)  # same weights: still loads; other weights: one clear line
    with torch.no_grad():
        source.encoder.trainable[0][0].conv1.weight.add_(1.0)
    source.save(path)
    with pytest.raises(CaptionLibError, match="encoder weights"):
        Captioner.load(tmp_path / "hard" / "last.pt")


def test_grounding_of_an_empty_caption_is_no_error():
    """A model may say nothing (e.g. hard attention early in training): no words, no score."""
    from caption_lib.metrics import grounding_report

    box = {"shape": "circle", "colour": "red", "size": "big", "box": [0, 0, 60, 60]}
    report = grounding_report([[]], [torch.zeros(0, 49)], [[box]])
    assert report["words"] == 0 and report["mass"] == 0.0


def _hard_ddp_worker(rank: int, world: int, port: int, data: str, out: str) -> None:
    import os
    from pathlib import Path

    import torch.distributed as dist

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      CAPTION_LIB_HOME=str(Path(out) / "workspace"))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    model_config, config = tiny_configs(epochs=1, attention="hard")
    config.batch_size = 4
    result = train(data, Path(out) / "ddp", model_config, config, progress=False,
                   log=lambda *_: None)
    torch.save(result.model.state_dict(), Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


def test_hard_attention_trains_data_parallel(tiny_shapes, tmp_path):
    """Two processes (Gloo): the same weights on both ranks. Every forward uses rank 0's
    baseline (DDP broadcasts buffers from rank 0), which is what the checkpoint keeps."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_hard_ddp_worker, args=(2, port, str(tiny_shapes), str(tmp_path)), nprocs=2,
             join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    for name in ranks[0]:
        if name != "decoder.baseline":  # rank 1's own last update, never used
            assert torch.equal(ranks[0][name], ranks[1][name]), name
    assert float(ranks[0]["decoder.baseline"]) < 0
    assert Captioner.load(tmp_path / "ddp" / "last.pt").config.attention == "hard"
