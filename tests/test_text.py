"""Tokenizer, text encoder, measured attributes and captions (tinyddpm.text, chapter 9)."""

import math
import warnings

import pytest
import torch

from tinyddpm.nets.text import (
    BOS,
    DIGIT_WORDS,
    EOS,
    PAD,
    UNK,
    TextEncoder,
    TextEncoderConfig,
    Tokenizer,
    attribute_labels,
    digit_caption,
    measure_ink,
    measure_slant,
    random_captions,
    split_words,
)


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.for_digits(max_length=8)


def test_split_words_lowercases_and_drops_punctuation():
    assert split_words("A Thick SEVEN!") == ["a", "thick", "seven"]
    assert split_words("  the digit 7. ") == ["the", "digit", "7"]
    assert split_words("") == []
    with pytest.raises(TypeError, match="prompt must be a str"):
        split_words(7)


def test_encode_layout_and_mask(tok):
    ids, mask = tok.encode(["a seven", ""])
    v = tok.vocab
    assert ids.shape == mask.shape == (2, 8) and ids.dtype == torch.long and mask.dtype == torch.bool
    assert ids[0].tolist() == [BOS, v.index("a"), v.index("seven"), EOS, PAD, PAD, PAD, PAD]
    assert ids[1].tolist() == [BOS, EOS] + [PAD] * 6            # the empty prompt: unconditional
    assert mask[0].tolist() == [True] * 4 + [False] * 4
    assert mask[1].sum() == 2


def test_unknown_words_map_to_unk_and_round_trip(tok):
    ids, _ = tok.encode("a purple seven")
    assert ids[0, 2] == UNK
    assert tok.decode(ids) == ["a <unk> seven"]
    for prompt in ["a handwritten seven", "the digit 7", "a thick 3", "number nine"]:
        assert tok.decode(tok.encode(prompt)[0]) == [prompt]


def test_every_caption_is_in_the_vocabulary(tok):
    for d in range(10):
        for adj in ("", "thick", "thin", "slanted"):
            for k in range(12):
                ids, _ = tok.encode(digit_caption(d, adj, k))
                assert UNK not in ids.tolist()[0]


def test_truncation_warns_and_keeps_first_words(tok):
    long = "a very very very thick handwritten seven indeed"
    with pytest.warns(UserWarning, match="keeping the first 6"):
        ids, mask = tok.encode(long)
    assert mask.all() and ids[0, -1] == EOS
    assert tok.decode(ids) == [" ".join(split_words(long)[:6]).replace("very", "<unk>")]


def test_all_unknown_warns_but_known_or_empty_does_not(tok):
    with pytest.warns(UserWarning, match="no word of prompt"):
        tok.encode("purple elephant")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tok.encode(["", "a seven", "purple seven"])             # one known word is enough


def test_tokenizer_validation():
    with pytest.raises(ValueError, match="must start with the special tokens"):
        Tokenizer(("a", "b"))
    with pytest.raises(ValueError, match="duplicate"):
        Tokenizer(("<pad>", "<unk>", "<bos>", "<eos>", "a", "a"))
    with pytest.raises(ValueError, match="max_length must be >= 3"):
        Tokenizer.for_digits(max_length=2)
    t = Tokenizer.for_digits()
    assert Tokenizer.from_config(t.to_config()) == t


def test_text_encoder_shape_and_padding_is_ignored(tok):
    torch.manual_seed(0)
    enc = TextEncoder(TextEncoderConfig(vocab_size=len(tok), max_length=8, dim=32, depth=2, heads=4)).eval()
    ids, mask = tok.encode(["a thick seven", "3"])
    ctx = enc(ids, mask)
    assert ctx.shape == (2, 8, 32)
    ids2 = ids.clone()
    ids2[~mask] = tok.vocab.index("nine")                          # garbage where the mask is False
    ctx2 = enc(ids2, mask)
    torch.testing.assert_close(ctx2[mask], ctx[mask], rtol=0, atol=1e-6)
    assert not torch.allclose(ctx2[~mask], ctx[~mask])            # the positions differ, the words do not see them
    with pytest.raises(ValueError, match=r"ids must have shape \(B, 8\)"):
        enc(ids[:, :5], mask[:, :5])


# ---------------------------------------------------------------- measured attributes
def _canvas(size=16):
    return -torch.ones(1, 1, size, size)


def test_measure_ink_is_mean_ink():
    x = _canvas()
    assert measure_ink(x).item() == 0.0
    assert measure_ink(torch.ones(1, 1, 16, 16)).item() == 1.0
    thin, thick = _canvas(), _canvas()
    thin[..., 2:14, 7] = 1
    thick[..., 2:14, 7:9] = 1
    assert measure_ink(thin).item() == pytest.approx(12 / 256)
    assert measure_ink(thick).item() == pytest.approx(2 * measure_ink(thin).item())
    half = _canvas()
    half[..., 0, 0] = 0.0                                          # grey pixel = half ink
    assert measure_ink(half).item() == pytest.approx(0.5 / 256)
    with pytest.raises(ValueError, match=r"greyscale images \(B, 1, H, W\)"):
        measure_ink(torch.zeros(2, 3, 8, 8))


def test_measure_slant_on_lines_of_known_angle():
    def line(slope):                     # u = u0 + slope * (height); row r has height -r
        x = _canvas(33)
        for r in range(10, 23):
            x[0, 0, r, 16 + slope * (16 - r)] = 1
        return x

    assert measure_slant(line(0)).item() == pytest.approx(0.0, abs=1e-5)
    assert measure_slant(line(1)).item() == pytest.approx(45.0, abs=1e-4)       # top leans right
    assert measure_slant(line(-1)).item() == pytest.approx(-45.0, abs=1e-4)
    assert measure_slant(line(2)).item() == pytest.approx(math.degrees(math.atan(2)), abs=1e-4)
    # invariant to where the stroke is and how thick it is (a second line one pixel to the right)
    shifted = torch.roll(line(1), shifts=(2, -3), dims=(2, 3))
    assert measure_slant(shifted).item() == pytest.approx(45.0, abs=1e-4)
    thick = torch.maximum(line(1), torch.roll(line(1), 1, dims=3))
    assert measure_slant(thick).item() == pytest.approx(45.0, abs=1e-4)


def test_attribute_labels_are_relative_to_the_class():
    # class 0: strokes of width 1, 2, 3; class 1: widths 3, 4, 5 → "thin" is the thinnest of EACH class
    xs = []
    for w in (1, 2, 3, 3, 4, 5):
        x = _canvas(8)
        x[..., 1:7, 2 : 2 + w] = 1
        xs.append(x)
    x, labels = torch.cat(xs), torch.tensor([0, 0, 0, 1, 1, 1])
    thick, _ = attribute_labels(x, labels)
    assert thick == ["thin", "", "thick", "thin", "", "thick"]


def test_digit_caption_and_random_captions():
    assert digit_caption(7) == "a handwritten seven"
    assert digit_caption(7, "", 1) == "the digit 7"
    assert digit_caption(3, "slanted", 1) == "a slanted 3"
    assert digit_caption(3, "thick", 0) == "a thick three"
    with pytest.raises(ValueError, match="adjective must be one of"):
        digit_caption(3, "purple")
    with pytest.raises(ValueError, match="label must be <= 9"):
        digit_caption(12)
    n = 4000
    labels = torch.arange(n) % 10
    thick, lean = ["thick"] * n, [""] * n
    caps = random_captions(labels, thick, lean, generator=torch.Generator().manual_seed(0))
    again = random_captions(labels, thick, lean, generator=torch.Generator().manual_seed(0))
    assert caps == again
    p_empty = sum(c == "" for c in caps) / n                      # Binomial(4000, 0.1): sd ≈ 0.0047
    assert abs(p_empty - 0.1) < 0.02
    with_adj = [c for c in caps if "thick" in c]                    # P = 0.9 · 0.5
    assert abs(len(with_adj) / n - 0.45) < 0.03
    assert not any(a in c for c in caps for a in ("thin", "slanted"))  # only attributes the image has
    for c, y in zip(caps, labels.tolist(), strict=True):
        if c:
            assert DIGIT_WORDS[y] in c.split() or str(y) in c.split()
    none = random_captions(labels[:50], thick[:50], lean[:50], generator=torch.Generator(), drop_prob=0.0)
    assert "" not in none
