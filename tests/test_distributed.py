"""Data-parallel training: 2 processes on the CPU (Gloo) behave like 1 process.

The workers are started with `torch.multiprocessing.spawn` on a free loopback port (as
torchrun would start them), one spawn per test; the last test runs the real command
`torchrun --nproc_per_node=2 -m caption_lib train`. Tiny data (`tiny_shapes`) and a tiny
model keep the whole file near a minute on 2 CPU cores.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from caption_lib import distributed
from caption_lib.errors import CaptionLibError
from caption_lib.model import Captioner
from conftest import tiny_configs

GLOBAL_BATCH = 4  # images per optimiser step, in both runs (2 per process with 2 processes)
UNEVEN = 23  # global batches of 23 and 1 of the 24 training images: in the second, rank 1
#              has no image and joins the all-reduce with a zero loss


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _quiet(*_):
    pass


def _configs(epochs: int, dropout: float = 0.0, batch_size: int = GLOBAL_BATCH):
    model_config, config = tiny_configs(epochs=epochs)
    model_config.dropout = dropout  # dropout masks differ per process: off for equality
    config.batch_size = batch_size
    return model_config, config


def _step_gradients(data: str, rank: int, world: int, normalise: bool = True) -> dict:
    """The decoder's gradient for the first global batch of 8 images, through the trainer's
    own pieces (`distributed.split_batch` and its loss weights, DDP when `world` > 1)."""
    from caption_lib.annotations import load_dataset, split_records
    from caption_lib.features import workspace_features
    from caption_lib.train import CachedSplit, _data_parallel
    from caption_lib.vocab import Vocabulary

    model_config, config = _configs(epochs=1)
    records = split_records(load_dataset(data), "train")
    torch.manual_seed(0)
    vocab = Vocabulary.build([c for r in records for c in r.captions], min_freq=1)
    model = Captioner(vocab, model_config).train()
    cpu = torch.device("cpu")
    split = CachedSplit(records, workspace_features(model.encoder, records, cpu, False), vocab,
                        config.max_caption_len)
    pairs = split.epoch_batches(8, 0, torch.Generator().manual_seed(1))[0]
    mine, weights = distributed.split_batch(pairs, split.targets, rank, world)
    batch = split.batch(mine, weights)
    loss_fn = _data_parallel(model, cpu)  # keep the DDP wrapper alive until backward()
    loss, _ = loss_fn(batch.cached, batch.captions, batch.lengths, owner=batch.owner,
                      weights=weights if normalise else None)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.decoder.named_parameters()}


# -- what each of the 2 processes runs ---------------------------------------------------

def _worker(rank: int, world: int, port: int, data: str, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      CAPTION_LIB_HOME=str(Path(out) / "workspace"))  # a cold feature cache
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    import caption_lib.evaluate as evaluate_module
    import caption_lib.train as train_module
    from caption_lib.model import Captioner as _Captioner

    out = Path(out)
    saves, scored = [], []
    real_save, real_bleu = _Captioner.save, evaluate_module.bleu

    def counting_save(self, path, extra=None):  # which process writes which checkpoint
        saves.append(Path(path).name)
        return real_save(self, path, extra=extra)

    def recording_bleu(refs, hyps):  # which images the evaluation scored
        scored.append([r[0] for r in refs])
        return real_bleu(refs, hyps)

    _Captioner.save, evaluate_module.bleu = counting_save, recording_bleu
    # 0) one step's gradient, with the global normalisation and without it
    grads = _step_gradients(data, rank, world)
    naive = _step_gradients(data, rank, world, normalise=False)
    # 1) the run to compare with one process (dropout off)
    model_config, config = _configs(epochs=2, batch_size=UNEVEN)
    result = train_module.train(data, out / "ddp", model_config, config, progress=False,
                                log=_quiet)
    # 2) resume under DDP (dropout on: each rank's RNG must be restored) vs straight
    model_config, config = _configs(epochs=2, dropout=0.3)
    straight = train_module.train(data, out / "straight", model_config, config,
                                  progress=False, log=_quiet)
    model_config, config = _configs(epochs=1, dropout=0.3)
    train_module.train(data, out / "resumed", model_config, config, progress=False, log=_quiet)
    config.epochs = 2
    resumed = train_module.train(data, out / "resumed", config=config, resume=True,
                                 progress=False, log=_quiet)
    torch.save({"grads": grads, "naive": naive, "weights": result.model.state_dict(), "history": result.history,
                "straight": straight.model.state_dict(), "resumed": resumed.model.state_dict(),
                "straight_history": straight.history, "resumed_history": resumed.history,
                "saves": saves, "scored": scored}, out / f"rank{rank}.pt")
    dist.destroy_process_group()


def _sharded_cache_worker(rank: int, world: int, port: int, data: str, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from caption_lib.annotations import load_dataset
    from caption_lib.encoder import EncoderCNN
    from caption_lib.features import cached_features

    paths = [r.image for r in load_dataset(data)][:11]  # 11: blocks of 5 and 6 images
    encoder = EncoderCNN(weights=None, fine_tune="layer4")
    store = cached_features(encoder, paths, cache_root=Path(out) / "sharded", progress=False)
    (Path(out) / f"cache{rank}.txt").write_text(str(store.path))
    dist.destroy_process_group()


def _spawn(fn, *args) -> None:
    mp.spawn(fn, args=(2, _free_port(), *map(str, args)), nprocs=2, join=True)


# -- tests ---------------------------------------------------------------------------------

def test_shards_cover_every_item_once_without_padding():
    items = list(range(7))
    shards = [distributed.shard(items, r, 3) for r in range(3)]
    assert shards == [[0, 3, 6], [1, 4], [2, 5]]
    assert [list(distributed.block(7, r, 3)) for r in range(3)] == [[0, 1], [2, 3], [4, 5, 6]]
    parts = [{i: f"caption {i}" for i in s} for s in shards]
    assert distributed.merge_by_index(parts, 7) == [f"caption {i}" for i in range(7)]
    with pytest.raises(CaptionLibError, match="item 3 computed by two processes"):
        distributed.merge_by_index(parts + [{3: "again"}], 7)
    with pytest.raises(CaptionLibError, match="1 of 8 items computed by no process"):
        distributed.merge_by_index(parts, 8)
    with pytest.raises(CaptionLibError, match="rank 3 outside 0..2"):
        distributed.shard(items, 3, 3)


def test_without_a_process_group_everything_is_one_process():
    assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)
    assert distributed.setup() is False
    assert distributed.all_reduce_sum([1, 2.5]) == [1.0, 2.5]
    assert distributed.all_gather_object({"a": 1}) == [{"a": 1}]
    distributed.barrier()


def test_each_rank_takes_every_nth_image_of_a_global_batch():
    # 3 images with 2, 1, 2 captions of 5, 4, 6, 3, 5 tokens (incl. <start>/<end>)
    encoded = [[[0] * 5, [0] * 4], [[0] * 6], [[0] * 3, [0] * 5]]

    def targets(pair):  # tokens after <start>
        return len(encoded[pair[0]][pair[1]]) - 1

    batch = [(2, 1), (0, 0), (2, 0), (1, 0), (0, 1)]
    total = (4 + 3) + 5 + (2 + 4)
    assert distributed.split_batch(batch, targets, 0, 1) == (batch, None)
    # images in batch order: 2, 0, 1 -> rank 0 gets images 2 and 1, rank 1 image 0; the
    # weights are the share of the tokens and captions times world: means over the rank's
    # own counts become sums over (global counts / world)
    assert distributed.split_batch(batch, targets, 0, 2) == (
        [(2, 1), (2, 0), (1, 0)], ((4 + 2 + 5) * 2 / total, 3 * 2 / 5))
    assert distributed.split_batch(batch, targets, 1, 2) == (
        [(0, 0), (0, 1)], ((3 + 4) * 2 / total, 2 * 2 / 5))
    # a short last batch: rank 3 of 4 has no image, runs one pair with weights 0
    assert distributed.split_batch(batch, targets, 3, 4) == ([(2, 1)], (0.0, 0.0))


@pytest.fixture
def one_thread():
    """The one-process reference computed with 1 thread, as each DDP worker runs: with 2
    threads its reductions are split differently, and how far that moves float rounding
    depends on the CPU's kernels (it broke these tolerances on some machines)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def ddp_run(tiny_shapes, tmp_path_factory):
    """2 processes: a run, a straight run and an interrupted + resumed one (dropout on)."""
    out = tmp_path_factory.mktemp("ddp")
    _spawn(_worker, tiny_shapes, out)
    return out, [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


def test_two_processes_compute_the_gradient_of_one_at_the_same_global_batch(
        tiny_shapes, ddp_run, monkeypatch, one_thread):
    out, ranks = ddp_run
    monkeypatch.setenv("CAPTION_LIB_HOME", str(out / "workspace"))  # the same cached features
    one = _step_gradients(tiny_shapes, 0, 1)
    naive_gap = 0.0
    for name, g in one.items():
        for r in ranks:  # DDP's averaged gradient, the same on both ranks
            assert torch.allclose(r["grads"][name], g, rtol=1e-4, atol=1e-6), name
        naive_gap = max(naive_gap, float((ranks[0]["naive"][name] - g).abs().max()))
    # a per-process mean loss (no global normalisation) is measurably another gradient
    assert naive_gap > 1e-3, naive_gap


def test_two_processes_train_the_weights_of_one_at_the_same_global_batch(
        tiny_shapes, tmp_path, ddp_run, monkeypatch, one_thread):
    """2 epochs of 2 steps each (global batches of 23 and 1 images; 12 + 11, then 1 + 0
    per process).

    Tolerance: the gradients agree to float rounding (test above), but Adam amplifies
    rounding: an entry whose true gradient is near 0 is computed as a sum of larger terms
    that cancel, so its rounding noise is as large as it is and Adam (which divides by the
    gradient's own size) moves it by up to a whole lr step on noise. This tiny model has
    many such entries (in `init_h`, `encoder_att` and `f_beta`, which read the frozen
    random ResNet's features). So ONE process trained with 1 thread and then with 2 (other
    rounding, nothing else changed) already ends with 0.63% of the decoder's weights more
    than 1e-4 apart, the largest gap 0.0107, after these 4 steps; two processes against
    one measured 0.56% and 0.0107, and the gap's norm 0.53% of the distance the weights
    travelled (with features from `features.fold_batchnorm`; 0.05% before it, on other
    features). The bounds: at most 2% of the weights differ by more than 1e-4, no entry
    by more than 6 lr steps, the gap below 1% of the distance travelled. A wrong
    combination of the processes' gradients fails the test above, and moves most weights.
    The attention score's bias is left out: its true gradient is 0 (softmax ignores a
    constant), so Adam moves it on rounding noise alone."""
    from caption_lib.train import train

    out, ranks = ddp_run
    monkeypatch.setenv("CAPTION_LIB_HOME", str(out / "workspace"))  # the same cached features
    model_config, config = _configs(epochs=2, batch_size=UNEVEN)
    one = train(tiny_shapes, tmp_path / "one", model_config, config, progress=False, log=_quiet)
    start = train(tiny_shapes, tmp_path / "start", model_config, _configs(epochs=0)[1],
                  progress=False, log=_quiet).model.state_dict()  # the initial weights
    for name in one.model.state_dict():
        assert torch.equal(ranks[0]["weights"][name], ranks[1]["weights"][name]), name
    names = [n for n in one.model.state_dict() if n.startswith("decoder.")
             and n != "decoder.attention.full_att.bias"]
    gap = torch.cat([(ranks[0]["weights"][n] - one.model.state_dict()[n]).abs().flatten()
                     for n in names])  # (number of decoder weights,)
    travelled = torch.cat([(one.model.state_dict()[n] - start[n]).flatten() for n in names])
    assert float((gap > 1e-4).float().mean()) < 2e-2, float((gap > 1e-4).float().mean())
    assert float(gap.max()) < 6 * config.lr, float(gap.max())
    assert float(gap.norm() / travelled.norm()) < 1e-2, float(gap.norm() / travelled.norm())
    for a, b in zip(ranks[0]["history"], one.history):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
        assert a["val_bleu4"] == pytest.approx(b["val_bleu4"], rel=1e-3, abs=1e-9)
    untimed = [[{k: v for k, v in h.items() if "seconds" not in k and "_per_s" not in k}
                for h in r["history"]] for r in ranks]
    assert untimed[0] == untimed[1], "both ranks log the same history"


def test_evaluation_scores_every_image_exactly_once(tiny_shapes, ddp_run):
    from caption_lib.annotations import load_dataset, split_records
    from caption_lib.vocab import tokenize

    _, ranks = ddp_run
    val = [tokenize(r.captions[0]) for r in split_records(load_dataset(tiny_shapes), "val")]
    assert len(val) == 6
    assert len(ranks[0]["scored"]) == 2 + 2 + 1 + 1, "one evaluation per epoch of each run"
    for refs in ranks[0]["scored"]:
        assert refs == val, "each val image once, in order"
    assert ranks[0]["scored"] == ranks[1]["scored"], "both ranks score the same merged list"


def test_checkpoints_are_written_once_by_rank_0(ddp_run):
    out, ranks = ddp_run
    assert ranks[1]["saves"] == []
    assert ranks[0]["saves"].count("last.pt") == 2 + 2 + 1 + 1  # epochs of the 4 runs
    loaded = Captioner.load(out / "ddp" / "last.pt")
    assert loaded.extra["epoch"] == 2 and loaded.extra["world_size"] == 2
    assert len(loaded.extra["rng_ranks"]) == 2
    assert sorted(p.name for p in (out / "ddp").iterdir()) == ["best.pt", "last.pt"]


def test_resume_under_ddp_reproduces_the_uninterrupted_run(ddp_run):
    _, ranks = ddp_run
    for r in ranks:
        assert [h["epoch"] for h in r["resumed_history"]] == [1, 2]
        for key in ("train_loss", "val_loss", "val_bleu4"):
            assert [h[key] for h in r["resumed_history"]] == [h[key] for h in r["straight_history"]]
        for name, w in r["straight"].items():
            assert torch.equal(w, r["resumed"][name]), name


def test_sharded_extraction_makes_the_single_process_cache(tiny_shapes, tmp_path):
    from caption_lib.annotations import load_dataset
    from caption_lib.encoder import EncoderCNN
    from caption_lib.features import cached_features

    _spawn(_sharded_cache_worker, tiny_shapes, tmp_path)
    folders = {(tmp_path / f"cache{r}.txt").read_text() for r in range(2)}
    assert len(folders) == 1, "both ranks read the same cache"
    sharded_path = Path(folders.pop())
    sharded = np.load(sharded_path)
    paths = [r.image for r in load_dataset(tiny_shapes)][:11]
    one = cached_features(EncoderCNN(weights=None, fine_tune="layer4"), paths,
                          cache_root=tmp_path / "one", progress=False)
    assert sharded.shape == one.shape == (11, 1024, 14, 14)
    diff = np.abs(sharded.astype(np.float32) - one.array.astype(np.float32)).max()
    assert diff <= 1e-2, diff
    assert sharded_path.parent.name == Path(one.path).parent.name  # same key, same folder
    meta = json.loads((sharded_path.parent / "meta.json").read_text())
    assert meta["shards"] == 2 and meta["key"] == one.meta["key"]
    assert not list((tmp_path / "sharded" / ".shards").iterdir()), "per-rank blocks removed"

def test_caption_lib_train_under_torchrun(tiny_shapes, tmp_path):
    """The real command: 2 processes, fine-tuned layer4 (DDP over the encoder stage too)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CAPTION_LIB_HOME": str(tmp_path / "ws"),
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]),
                                          os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
           f"--master_port={_free_port()}", "-m", "caption_lib", "train",
           "--data", str(tiny_shapes), "--out", str(tmp_path / "run"), "--epochs", "2",
           "--encoder-epochs", "1", "--batch-size", "8", "--no-progress"]
    done = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "bucket_view" not in done.stderr, "DDP buckets match the gradients' strides"
    assert done.stdout.count("best val BLEU-4") == 1, done.stdout  # rank 0 only
    epochs = [line.split(":")[0] for line in done.stdout.splitlines() if line.startswith("epoch ")]
    assert epochs == ["epoch 1", "epoch 2"], done.stdout  # rank 0 only
    # epoch 2 trains the decoder alone (DDP over the decoder only) on layer4's cached
    # output, which rank 0 computed from the layer3 cache while rank 1 waited
    assert done.stdout.count("frozen after epoch 1") == 1, done.stdout
    loaded = Captioner.load(tmp_path / "run" / "last.pt")
    assert loaded.encoder.trained_stages == ("layer4",) and loaded.extra["world_size"] == 2
    caches = sorted(p.parent.name.split("-")[1] for p in (tmp_path / "ws" / "features")
                    .glob("*/meta.json"))
    assert caches == ["layer3"] * 2 + ["layer4"] * 2, caches  # train and val, each once
