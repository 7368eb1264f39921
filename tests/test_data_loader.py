"""Packing, dynamic masking and the rank-sharded, resumable MLM loader, on the bundled Tiny Shakespeare."""
import numpy as np
import pytest
import torch

from fastroberta.data import IGNORE_INDEX, MLMDataLoader, Packer, mask_tokens, prepare_dataset

BOS, PAD, EOS, UNK, MASK = 0, 1, 2, 3, 4
SPECIALS = [BOS, PAD, EOS, UNK, MASK]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    # The bundled corpus with the default 8192-entry tokenizer, shared by the loader tests.
    return prepare_dataset(None, cache_dir=tmp_path_factory.getbasetemp() / "fastroberta-cache",
                           show_progress=False)


def take(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def assert_batches_equal(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def documents(prepared, split="train"):
    tokens, offsets = prepared.tokens(split), prepared.doc_offsets(split)
    return [tokens[a:b - 1] for a, b in zip(offsets[:-1], offsets[1:])]


def all_samples(prepared, seq_len, packing, split="train"):
    """Every sample of the split, in index order: (rows [n, seq_len], lengths [n], segment lengths or None)."""
    packer = Packer(prepared, split, seq_len, packing)
    rows = np.full((packer.num_samples, seq_len), PAD, np.int64)
    lengths, segments = packer.fill(np.arange(packer.num_samples), rows)
    return rows, lengths, segments


# --- masking ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mask_prob", [0.15, 0.3])
def test_masking_statistics(mask_prob):
    vocab = 200
    rng = np.random.default_rng(0)
    original = rng.integers(5, vocab, size=(64, 512))
    original[:, 0] = BOS
    original[rng.random(original.shape) < 0.05] = EOS
    for b in range(64):                       # padded tails of assorted lengths
        original[b, 512 - 8 * b:] = PAD
    maskable = np.ones(vocab, bool)
    maskable[SPECIALS] = False
    random_ids = np.flatnonzero(maskable)
    draws = []
    for draw in range(6):
        ids = original.copy()
        keys = np.arange(64, dtype=np.uint64) + np.uint64(1000 * draw)
        labels = mask_tokens(ids, keys, maskable, random_ids, MASK, mask_prob=mask_prob)
        draws.append((ids, labels))
    ids = np.concatenate([d[0] for d in draws])
    labels = np.concatenate([d[1] for d in draws])
    before = np.concatenate([original] * len(draws))
    chosen = labels != IGNORE_INDEX
    can = maskable[before]
    # Labels only at chosen positions, holding the original id; specials and padding never chosen.
    assert not chosen[~can].any()
    assert np.array_equal(labels[chosen], before[chosen])
    assert np.array_equal(ids[~chosen], before[~chosen])
    rate = chosen.sum() / can.sum()
    assert abs(rate - mask_prob) < 0.005, rate      # > 6 standard deviations over ~170K maskable tokens
    masked = chosen & (ids == MASK)
    kept = chosen & (ids == before)
    randomized = chosen & ~masked & ~kept
    total = chosen.sum()
    assert abs(masked.sum() / total - 0.8) < 0.012
    assert abs(kept.sum() / total - 0.1) < 0.01      # a random draw equal to the original counts as kept (0.1%)
    assert abs(randomized.sum() / total - 0.1) < 0.01
    drawn = ids[randomized]
    assert not np.isin(drawn, SPECIALS).any()
    # The random tokens cover the non-special vocabulary evenly: a chi-square statistic far below the 6-sigma
    # bound of its distribution (mean = degrees of freedom, variance = twice that).
    counts = np.bincount(drawn, minlength=vocab)[5:]
    expected = len(drawn) / len(counts)
    chi2 = ((counts - expected) ** 2 / expected).sum()
    dof = len(counts) - 1
    assert chi2 < dof + 6 * np.sqrt(2 * dof), chi2


def test_mask_depends_only_on_key_and_content():
    maskable = np.ones(100, bool)
    maskable[SPECIALS] = False
    ids = np.random.default_rng(1).integers(5, 100, size=(3, 200))
    keys = np.array([7, 8, 9], np.uint64)
    whole = ids.copy()
    labels = mask_tokens(whole, keys, maskable, np.arange(5, 100), MASK)
    row = ids[1:2].copy()
    assert np.array_equal(mask_tokens(row, keys[1:2], maskable, np.arange(5, 100), MASK), labels[1:2])
    assert np.array_equal(row, whole[1:2])
    assert not np.array_equal(labels[0], labels[2])


def test_loader_masking_over_an_epoch(prepared):
    loader = MLMDataLoader(prepared, seq_len=128, micro_batch_size=64, packing="doc")
    chosen = maskable = 0
    for batch in take(loader, len(loader)):
        ids, labels, attention = batch["input_ids"], batch["labels"], batch["attention_mask"]
        original = torch.where(labels != IGNORE_INDEX, labels, ids)
        special = torch.isin(original, torch.tensor(SPECIALS))
        assert not (labels != IGNORE_INDEX)[special].any()
        assert ((original == PAD) == (attention == 0)).all()
        chosen += int((labels != IGNORE_INDEX).sum())
        maskable += int((~special).sum())
    assert abs(chosen / maskable - 0.15) < 0.005


def test_masks_are_redrawn_every_epoch(prepared):
    loader = MLMDataLoader(prepared, seq_len=64, micro_batch_size=4, seed=3)
    sample = loader.samples_of(0, 0)[:1]
    epoch0, epoch0_again, epoch1 = (loader.collate(e, sample) for e in (0, 0, 1))
    assert_batches_equal(epoch0, epoch0_again)
    original = torch.where(epoch0["labels"] != IGNORE_INDEX, epoch0["labels"], epoch0["input_ids"])
    original1 = torch.where(epoch1["labels"] != IGNORE_INDEX, epoch1["labels"], epoch1["input_ids"])
    assert torch.equal(original, original1)                        # same tokens ...
    assert not torch.equal(epoch0["labels"], epoch1["labels"])    # ... fresh mask
    # A sample's mask ignores its batch-mates.
    pair = np.concatenate([loader.samples_of(0, 5)[:1], sample])
    assert_batches_equal({k: v[1:] for k, v in loader.collate(0, pair).items()}, epoch0)


def test_any_seed_and_epoch_without_warnings(prepared):
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for seed in (0, -1, 2**64 - 1, 12345678901234567890):
            loader = MLMDataLoader(prepared, seq_len=64, micro_batch_size=2, seed=seed)
            loader.set_epoch(2**40)
            next(iter(loader))


# --- packing ----------------------------------------------------------------------------------------------

def check_rows(rows, lengths, seq_len):
    assert (lengths <= seq_len).all() and (lengths >= 3).all()
    assert (rows[:, 0] == BOS).all()
    assert (rows[np.arange(len(rows)), lengths - 1] == EOS).all()
    real = np.arange(seq_len)[None, :] < lengths[:, None]
    assert (rows[~real] == PAD).all() and not (rows[real] == PAD).any()


@pytest.mark.parametrize("seq_len", [64, 129])
def test_full_sentences_packing(prepared, seq_len):
    rows, lengths, _ = all_samples(prepared, seq_len, "full")
    check_rows(rows, lengths, seq_len)
    assert (lengths[:-1] >= seq_len - 2).all()   # full but for a dropped leading </s> or an own </s> at the end
    docs = documents(prepared)
    doc_tokens = np.concatenate(docs)
    content, boundaries, sample_edges, produced = [], set(), set(), 0
    for row, n in zip(rows, lengths):
        body = row[1:n - 1]
        for t in body:
            if t == EOS:
                boundaries.add(produced)                    # a </s> inside a sample separates documents
            else:
                content.append(t)
                produced += 1
        sample_edges.add(produced)
    # Every document token exactly once, in order; </s> exactly at document boundaries.
    assert np.array_equal(np.asarray(content), doc_tokens)
    doc_edges = set(np.cumsum([len(d) for d in docs])[:-1].tolist())
    assert boundaries <= doc_edges
    assert doc_edges - sample_edges <= boundaries
    assert not (set(np.flatnonzero(rows[:, 1] == EOS)))   # no sample opens with a stray </s>


def test_doc_sentences_packing(prepared):
    seq_len = 64
    rows, lengths, _ = all_samples(prepared, seq_len, "doc")
    check_rows(rows, lengths, seq_len)
    bodies = [row[1:n - 1] for row, n in zip(rows, lengths)]
    assert not any((b == EOS).any() for b in bodies)
    # Samples tile the documents one by one: never crossing a boundary, every token once.
    k = 0
    for doc in documents(prepared):
        pos = 0
        while pos < len(doc):
            assert np.array_equal(bodies[k], doc[pos:pos + seq_len - 2])
            pos += len(bodies[k])
            k += 1
    assert k == len(bodies)


def test_varlen_packing(prepared):
    seq_len = 96
    rows, lengths, segments = all_samples(prepared, seq_len, "varlen")
    check_rows(rows, lengths, seq_len)
    assert (seq_len - lengths[:-1] <= 2).all()      # padding only where no segment fits
    assert segments.sum() == lengths.sum() and (segments >= 3).all()
    flat = np.concatenate([row[:n] for row, n in zip(rows, lengths)])
    edges = np.concatenate([[0], np.cumsum(segments)])
    pieces = []
    for a, b in zip(edges[:-1], edges[1:]):
        seg = flat[a:b]
        assert seg[0] == BOS and seg[-1] == EOS and not np.isin(seg[1:-1], SPECIALS).any()
        pieces.append(seg[1:-1])
    # Segments are whole documents or consecutive pieces of one.
    k = 0
    for doc in documents(prepared):
        pos = 0
        while pos < len(doc):
            assert np.array_equal(pieces[k], doc[pos:pos + len(pieces[k])])
            pos += len(pieces[k])
            k += 1
    assert k == len(pieces)


def test_varlen_batches_carry_cu_seqlens(prepared):
    loader = MLMDataLoader(prepared, seq_len=96, micro_batch_size=4, packing="varlen")
    for batch in take(loader, 5):
        cu = batch["cu_seqlens"]
        assert cu.dtype == torch.int32 and cu[0] == 0
        assert cu[-1] == batch["attention_mask"].sum()
        flat = batch["input_ids"][batch["attention_mask"].bool()]
        labels = batch["labels"][batch["attention_mask"].bool()]
        original = torch.where(labels != IGNORE_INDEX, labels, flat)
        assert (original[cu[:-1].long()] == BOS).all() and (original[cu[1:].long() - 1] == EOS).all()
    for packing in ("full", "doc"):
        assert "cu_seqlens" not in next(iter(MLMDataLoader(prepared, seq_len=96, packing=packing)))


# --- the loader -------------------------------------------------------------------------------------------

def test_batch_format(prepared):
    batch = next(iter(MLMDataLoader(prepared, seq_len=128, micro_batch_size=8)))
    for key in ("input_ids", "attention_mask", "labels"):
        assert batch[key].dtype == torch.int64 and batch[key].shape == (8, 128)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert int(batch["input_ids"].max()) < prepared.vocab_size


def test_epoch_order(prepared):
    loader = MLMDataLoader(prepared, seq_len=128, micro_batch_size=8, global_batch_size=32)
    assert loader.grad_accum_steps == 4
    assert loader.steps_per_epoch == loader.num_samples // 32 and len(loader) == 4 * loader.steps_per_epoch
    seen = np.concatenate([loader.samples_of(0, i) for i in range(len(loader))])
    assert len(np.unique(seen)) == len(seen) == loader.steps_per_epoch * 32   # the remainder is dropped
    epoch1 = np.concatenate([loader.samples_of(1, i) for i in range(len(loader))])
    assert not np.array_equal(seen, epoch1)
    other_seed = MLMDataLoader(prepared, seq_len=128, micro_batch_size=8, global_batch_size=32, seed=1)
    assert not np.array_equal(other_seed.samples_of(0, 0), loader.samples_of(0, 0))


def test_ranks_are_disjoint_and_match_accumulation(prepared):
    kw = dict(seq_len=64, micro_batch_size=4, global_batch_size=8, seed=5)
    accumulating = MLMDataLoader(prepared, **kw)                              # 1 process, accumulation 2
    ranks = [MLMDataLoader(prepared, rank=r, world_size=2, **kw) for r in (0, 1)]
    big_micro = MLMDataLoader(prepared, seq_len=64, micro_batch_size=8, global_batch_size=8, seed=5)
    assert accumulating.grad_accum_steps == 2 and ranks[0].grad_accum_steps == 1
    steps = 6
    acc = take(accumulating, 2 * steps)
    per_rank = [take(r, steps) for r in ranks]
    whole = take(big_micro, steps)
    for s in range(steps):
        assert_batches_equal(acc[2 * s], per_rank[0][s])
        assert_batches_equal(acc[2 * s + 1], per_rank[1][s])
        assert_batches_equal(whole[s], {k: torch.cat([per_rank[0][s][k], per_rank[1][s][k]]) for k in whole[s]})
    r0 = np.concatenate([ranks[0].samples_of(0, i) for i in range(len(ranks[0]))])
    r1 = np.concatenate([ranks[1].samples_of(0, i) for i in range(len(ranks[1]))])
    assert not set(r0) & set(r1)


@pytest.mark.parametrize("packing", ["full", "varlen"])
def test_global_batch_does_not_depend_on_world_size(prepared, packing):
    # The data-order rule (ARCHITECTURE.md): global batch N, masks included, is a function of the seed and N
    # alone. Concatenating every rank's micro-batches of step N, in (micro-batch, rank) order, gives the same
    # rows whatever the world size and micro-batch split.
    kw = dict(seq_len=64, global_batch_size=16, seed=7, packing=packing)
    steps = 3
    union = {}
    for world, micro in ((1, 16), (1, 4), (2, 4), (4, 2), (4, 4)):
        loaders = [MLMDataLoader(prepared, micro_batch_size=micro, rank=r, world_size=world, **kw)
                   for r in range(world)]
        accum = loaders[0].grad_accum_steps
        per_rank = [take(loader, steps * accum) for loader in loaders]
        union[world, micro] = [{key: torch.cat([per_rank[r][s * accum + k][key] for k in range(accum)
                                               for r in range(world)])
                                for key in ("input_ids", "attention_mask", "labels")} for s in range(steps)]
    reference = union[1, 16]
    assert int((reference[0]["labels"] != IGNORE_INDEX).sum()) > 0
    for key, batches in union.items():
        for s in range(steps):
            assert_batches_equal(reference[s], batches[s])
    assert not torch.equal(reference[0]["input_ids"], reference[1]["input_ids"])


@pytest.mark.parametrize("packing", ["full", "varlen"])
def test_resume_gives_identical_batches(prepared, packing):
    kw = dict(seq_len=64, micro_batch_size=16, global_batch_size=64, packing=packing, seed=11)
    straight = MLMDataLoader(prepared, **kw)
    per_epoch = len(straight)
    stop = per_epoch - 3                                   # resume shortly before an epoch boundary
    it = iter(straight)
    for _ in range(stop):
        next(it)
    state = straight.state_dict()
    expected = [next(it) for _ in range(6)]
    assert straight.epoch == 1                             # the continuation crossed into the next epoch
    resumed = MLMDataLoader(prepared, **kw)
    resumed.load_state_dict(state)
    for want, got in zip(expected, take(resumed, 6)):
        assert_batches_equal(want, got)
    assert resumed.state_dict() == straight.state_dict()


def test_resume_on_another_world_size(prepared):
    kw = dict(seq_len=64, global_batch_size=16, seed=2)
    single = MLMDataLoader(prepared, micro_batch_size=8, **kw)      # accumulation 2
    it = iter(single)
    for _ in range(4):                                             # two whole optimizer steps
        next(it)
    state = single.state_dict()
    expected = [next(it), next(it)]
    for rank in (0, 1):
        loader = MLMDataLoader(prepared, micro_batch_size=8, rank=rank, world_size=2, **kw)
        loader.load_state_dict(state)
        assert_batches_equal(next(iter(loader)), expected[rank])
    next(it)
    with pytest.raises(ValueError, match="mid-step"):
        MLMDataLoader(prepared, micro_batch_size=8, world_size=2, **kw).load_state_dict(single.state_dict())
    with pytest.raises(ValueError, match="seed"):
        MLMDataLoader(prepared, micro_batch_size=8, seq_len=64, global_batch_size=16).load_state_dict(state)
    with pytest.raises(ValueError, match="global_batch_size"):
        MLMDataLoader(prepared, micro_batch_size=8, seq_len=64, global_batch_size=8, seed=2).load_state_dict(state)


def test_finite_validation_passes_repeat(prepared):
    val = MLMDataLoader(prepared, split="val", seq_len=128, micro_batch_size=8, infinite=False)
    first, second = list(val), list(val)
    assert len(first) == len(val) > 0
    for a, b in zip(first, second):
        assert_batches_equal(a, b)
    val.set_epoch(1)
    assert not torch.equal(next(iter(val))["labels"], first[0]["labels"])
    everything = MLMDataLoader(prepared, split="val", seq_len=128, micro_batch_size=8, infinite=False,
                               drop_last=False)
    seen = np.concatenate([everything.samples_of(0, i) for i in range(len(everything))])
    assert set(seen) == set(range(everything.num_samples))     # every sample; the last batch wraps around


def test_small_split_wraps_to_one_full_step(prepared):
    val = MLMDataLoader(prepared, split="val", seq_len=500, micro_batch_size=64, global_batch_size=128)
    assert val.num_samples < 128 and val.steps_per_epoch == 1 and len(val) == 2
    samples = np.concatenate([val.samples_of(0, 0), val.samples_of(0, 1)])
    assert set(samples) == set(range(val.num_samples))


def test_loader_bad_arguments(prepared, tmp_path):
    with pytest.raises(ValueError, match="divisible"):
        MLMDataLoader(prepared, micro_batch_size=8, world_size=2, global_batch_size=24)
    with pytest.raises(ValueError, match="rank"):
        MLMDataLoader(prepared, rank=2, world_size=2)
    with pytest.raises(ValueError, match="packing"):
        MLMDataLoader(prepared, packing="sentences")
    with pytest.raises(ValueError, match="split"):
        MLMDataLoader(prepared, split="test")
    with pytest.raises(ValueError, match="seq_len"):
        MLMDataLoader(prepared, seq_len=2)
    with pytest.raises(ValueError, match="mask_prob"):
        MLMDataLoader(prepared, mask_prob=1.5)
    with pytest.raises(TypeError, match="PreparedDataset"):
        MLMDataLoader("data.txt")
    (tmp_path / "short.txt").write_text("Too short to fill a sample.\n\nAnd a second document.")
    short = prepare_dataset(tmp_path / "short.txt", cache_dir=tmp_path / "c", vocab_size=300,
                            show_progress=False, val_fraction=0.0)
    with pytest.raises(ValueError, match="fewer than one sample"):
        MLMDataLoader(short, seq_len=128)
    with pytest.raises(ValueError, match="'val' split .* is empty"):
        MLMDataLoader(short, split="val", seq_len=8)
    assert len(MLMDataLoader(short, seq_len=8)) >= 1
