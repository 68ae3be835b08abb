"""Towers, tokenizer, captioned data and the joint-space evaluation."""

import pytest
import torch

from mlatlas.contrastive.clip import trim_padding
from mlatlas.contrastive.common import held_out, held_out_data, optimizer_step
from mlatlas.contrastive.data import DatasetError, load_captioned
from mlatlas.contrastive.evaluation import class_embeddings, retrieval
from mlatlas.contrastive.text import CaptionTokenizer, TextTower, load_tokenizer
from mlatlas.contrastive.towers import ConvTower, DualEncoder, ViTTower
from mlatlas.eval.metrics import recall_at_k
from mlatlas.nn.tokenizers import BOS, EOS, PAD
from mlatlas.nn.transformer import Transformer

CAPTIONS = ["two large red circles", "a small blue square on the left", "three tiny crosses"]


def test_tokenizer_round_trip_and_layout(tmp_path):
    tok = CaptionTokenizer.train(CAPTIONS * 10, vocab_size=80, max_len=12)
    ids, mask = tok.encode(CAPTIONS)
    assert ids.shape == (3, 12) and (ids[:, 0] == BOS).all()
    assert (ids[~mask] == PAD).all() and ((ids == EOS).sum(1) == 1).all()
    assert tok.decode(ids) == CAPTIONS
    tok.save(tmp_path / "tok.json")
    assert torch.equal(load_tokenizer(tmp_path / "tok.json", 12).encode(CAPTIONS)[0], ids)


def test_tokenizer_truncates_long_captions():
    tok = CaptionTokenizer.train(CAPTIONS, vocab_size=60, max_len=5)
    ids, mask = tok.encode(["two large red circles and three tiny crosses"])
    assert ids.shape == (1, 5) and mask.all() and ids[0, -1] == EOS


@pytest.mark.parametrize("pool", ["bos", "mean"])
def test_padding_does_not_change_the_text_feature(pool):
    tok = CaptionTokenizer.train(CAPTIONS, vocab_size=60, max_len=16)
    tower = TextTower(tok.vocab_size, 16, width=32, depth=2, pool=pool).eval()
    ids, mask = tok.encode(CAPTIONS)
    trimmed = trim_padding(ids, mask)
    assert trimmed[0].shape[1] == int(mask.sum(1).max()) < 16
    assert torch.allclose(tower(ids, mask), tower(*trimmed), atol=1e-5)


def test_mean_pooling_is_the_mean_of_the_real_token_outputs():
    tok = CaptionTokenizer.train(CAPTIONS, vocab_size=60, max_len=16)
    tower = TextTower(tok.vocab_size, 16, width=32, depth=1, pool="mean").eval()
    ids, mask = tok.encode(CAPTIONS[:2])
    h = tower.tokens(ids, mask)
    expected = torch.stack([h[i, mask[i]].mean(0) for i in range(2)])
    assert torch.allclose(tower(ids, mask), expected, atol=1e-6)
    with pytest.raises(ValueError, match="pool"):
        TextTower(10, 8, pool="max")


@pytest.mark.parametrize("stages, side", [(1, 32), (3, 8), (4, 4)])
def test_conv_tower_stages_halve_the_resolution(stages, side):
    tower = ConvTower(3, 32, stages)
    assert tower.tokens(torch.rand(2, 3, 32, 32)).shape == (2, side * side, 32)
    assert tower(torch.rand(2, 3, 32, 32)).shape == (2, 32)
    # Three stages keep the parameter names of the tower before stages existed.
    assert [k for k in tower.state_dict() if k.endswith("weight")][-2:] == (
        [f"net.{3 * stages - 3}.weight", f"net.{3 * stages - 2}.weight"])


def test_causal_mask_hides_the_future():
    net = Transformer(16, 2, 2).eval()
    h = torch.randn(2, 6, 16)
    changed = h.clone()
    changed[:, 4:] = torch.randn(2, 2, 16)
    out, out_changed = net(h, causal=True), net(changed, causal=True)
    assert torch.allclose(out[:, :4], out_changed[:, :4], atol=1e-6)
    assert not torch.allclose(out[:, 4:], out_changed[:, 4:])


@pytest.mark.parametrize("tower", [ConvTower(3, 32), ViTTower(3, 32, 4, 32, depth=1)])
def test_image_towers_shapes_and_errors(tower):
    images = torch.rand(5, 3, 32, 32)
    assert tower(images).shape == (5, 32)
    assert tower.tokens(images).shape[0] == 5 and tower.tokens(images).shape[2] == 32
    with pytest.raises(ValueError, match="needs"):
        tower(torch.rand(5, 1, 32, 32))


def test_dual_encoder_embeddings_are_normalised_and_losses_start_at_their_init():
    tok = CaptionTokenizer.train(CAPTIONS, vocab_size=60, max_len=12)
    ids, mask = tok.encode(CAPTIONS)
    for loss in ("clip", "siglip"):
        model = DualEncoder(ConvTower(3, 32), TextTower(tok.vocab_size, 12, 32, 1), 16, loss)
        x = model.encode_image(torch.rand(3, 3, 32, 32))
        assert torch.allclose(x.norm(dim=1), torch.ones(3))
        assert model(torch.rand(3, 3, 32, 32), ids, mask).isfinite()
    assert float(model.temperature_metrics()["t"]) == pytest.approx(10.0)
    with pytest.raises(ValueError, match="clip or siglip"):
        DualEncoder(ConvTower(3, 32), TextTower(60, 12, 32, 1), 16, "softmax")


def test_recall_at_k_by_hand():
    similarity = torch.tensor([[0.9, 0.1, 0.5], [0.8, 0.2, 0.7], [0.0, 1.0, 0.3]])
    positives = torch.eye(3, dtype=torch.bool)
    # Query 0 ranks its item first; query 1 ranks it third; query 2 ranks it second.
    assert recall_at_k(similarity, positives, (1, 2, 3)) == {1: 1 / 3, 2: 2 / 3, 3: 1.0}
    # A second positive for query 1 (item 0) puts it first.
    positives[1, 0] = True
    assert recall_at_k(similarity, positives, (1,))[1] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="positive"):
        recall_at_k(similarity, torch.zeros(3, 3, dtype=torch.bool))


def test_retrieval_counts_captions_with_the_same_content_as_positives():
    data = load_captioned("shapes", n_train=50, n_test=60)
    split = data.test
    # Embeddings that encode exactly what a caption says retrieve perfectly.
    onehot = torch.nn.functional.one_hot(split.keys, int(split.keys.max()) + 1).float()
    scores = retrieval(onehot, onehot, split)
    assert scores["i2t_recall@1"] == 1.0 and scores["t2i_recall@1"] == 1.0


def test_captioned_datasets():
    data = load_captioned("shapes", n_train=40, n_test=30, corrupt=0.5)
    assert data.image_shape == (3, 32, 32) and len(data.class_names) == 24
    assert data.train.corrupted.any() and not data.test.corrupted.any()
    # The zero-shot split holds only classes absent from training.
    assert not set(data.zero_shot.labels.tolist()) & set(
        load_captioned("shapes", n_train=2000).train.labels.tolist())
    digits = load_captioned("digits", corrupt=0.3)
    assert digits.image_shape == (1, 8, 8) and len(digits.class_names) == 10
    wrong = digits.train.corrupted
    assert 0.2 < float(wrong.float().mean()) < 0.4
    for y, c, bad in zip(digits.train.labels.tolist(), digits.train.captions, wrong.tolist(),
                         strict=True):
        says_y = digits.class_names[y] in c.split() or str(y) in c.split()
        assert says_y != bad, c
    with pytest.raises(DatasetError, match="did you mean shapes"):
        load_captioned("shape")


def test_prompt_ensemble_is_the_normalised_mean():
    class Fixed:
        def encode_text(self, ids, mask):
            return torch.nn.functional.normalize(ids[:, 1:3].float(), dim=-1)

    tok = CaptionTokenizer.train(["a red circle", "the red circle", "a blue square"], 40, 8)
    emb = class_embeddings(Fixed(), tok, ("red circle",), ("a {}", "the {}"))
    direct = Fixed().encode_text(tok.encode(["a red circle", "the red circle"])[0], None)
    assert torch.allclose(emb[0], torch.nn.functional.normalize(direct.mean(0), dim=0))


def test_held_out_examples_are_all_in_order_or_n_drawn_by_the_seed():
    assert torch.equal(held_out(10, None, seed=3), torch.arange(10))
    assert torch.equal(held_out(10, 10, seed=3), torch.arange(10))
    assert torch.equal(held_out(10, 25, seed=3), torch.arange(10))
    a, b, c = held_out(100, 20, 0), held_out(100, 20, 0), held_out(100, 20, 1)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert len(a.unique()) == 20 and torch.equal(a, a.sort().values)
    with pytest.raises(ValueError, match="at least 1"):
        held_out(10, 0, seed=0)
    data = load_captioned("digits")
    held = held_out_data(data, 50, seed=2)
    # Digits' zero-shot split is its test split: one draw for both.
    assert held.zero_shot is held.test and len(held.test) == 50
    assert held.test.captions == [data.test.captions[i] for i in held_out(360, 50, 2).tolist()]
    assert held.train is data.train


def test_optimizer_step_clips_the_global_gradient_norm_and_zero_disables_it():
    for grad_clip, moved in ((0.0, 50.0), (0.5, 0.5), (100.0, 50.0)):
        p = torch.nn.Parameter(torch.zeros(4))
        q = torch.nn.Parameter(torch.zeros(3))
        optimizer = torch.optim.SGD([p, q], lr=1.0)
        # |grad| = |(30, 0, 0, 0, 40, 0, 0)| = 50, shared by two parameters.
        optimizer_step(optimizer, 30 * p[0] + 40 * q[0], grad_clip)
        step = torch.cat([p.detach(), q.detach()]).norm()
        assert float(step) == pytest.approx(moved, rel=1e-6)
