"""Train a tiny sentencepiece tokenizer locally and save it as a transformers tokenizer directory.

No model hub is reachable on the CPU machine, so the tiny run trains its own tokenizer: a
sentencepiece BPE model (digits split one per token, byte fallback, no text normalization) that
is then rebuilt piece for piece as a ``tokenizers`` BPE, wrapped in ``PreTrainedTokenizerFast``
with pad / eos / bos / unk and a chat template, and saved with ``save_pretrained``. The directory
loads with ``AutoTokenizer.from_pretrained(dir)``; the sentencepiece file stays next to it as
``tokenizer.model``.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<s>", "</s>"


def train_sentencepiece(
    texts: Iterable[str], model_path: str | Path, *, vocab_size: int, user_symbols: Sequence[str]
) -> Path:
    """Train a BPE sentencepiece model on ``texts``; writes ``model_path`` (a ``.model`` file).

    Ids: 0 pad, 1 unk, 2 bos, 3 eos, then ``user_symbols``, then 256 byte pieces and merges.
    ``vocab_size`` is an upper bound (a small corpus may yield fewer pieces).
    """
    import sentencepiece as spm

    model_path = Path(model_path)
    model_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        corpus = Path(scratch) / "corpus.txt"
        corpus.write_text("\n".join(texts), encoding="utf-8")
        spm.SentencePieceTrainer.train(
            input=str(corpus),
            model_prefix=str(Path(scratch) / "spm"),
            model_type="bpe",
            vocab_size=vocab_size,
            hard_vocab_limit=False,
            split_digits=True,  # one token per digit: arithmetic stays learnable
            byte_fallback=True,
            character_coverage=1.0,
            normalization_rule_name="identity",
            add_dummy_prefix=False,
            remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True,
            pad_id=0,
            unk_id=1,
            bos_id=2,
            eos_id=3,
            pad_piece=PAD,
            unk_piece=UNK,
            bos_piece=BOS,
            eos_piece=EOS,
            user_defined_symbols=list(user_symbols),
            minloglevel=2,
        )
        shutil.copyfile(Path(scratch) / "spm.model", model_path)
    return model_path


def _fast_tokenizer_from_spm(model_path: Path) -> Any:
    """A ``tokenizers.Tokenizer`` that splits text like the sentencepiece BPE model.

    Normal pieces become the BPE vocabulary; merges are every split of a piece into two normal
    pieces, ranked by the merged piece's sentencepiece score (higher merges first), which is
    the order sentencepiece's BPE applies them in.
    """
    import sentencepiece as spm
    from tokenizers import Tokenizer, decoders, models, normalizers

    processor = spm.SentencePieceProcessor(model_file=str(model_path))
    vocab = {processor.id_to_piece(i): i for i in range(processor.get_piece_size())}
    normal = {
        processor.id_to_piece(i): (processor.get_score(i), i)
        for i in range(processor.get_piece_size())
        if not (processor.is_control(i) or processor.is_unknown(i) or processor.is_byte(i))
    }
    ranked = []
    for piece, (score, index) in normal.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in normal and right in normal:
                ranked.append((-score, index, left, right))
    merges = [(left, right) for _, _, left, right in sorted(ranked)]
    tokenizer = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, unk_token=UNK, fuse_unk=True, byte_fallback=True)
    )
    tokenizer.normalizer = normalizers.Replace(" ", "\u2581")  # sentencepiece's whitespace mark
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    return tokenizer


def build_hf_tokenizer(
    model_path: str | Path, *, role_tokens: Sequence[str], chat_template: str
) -> Any:
    """``PreTrainedTokenizerFast`` over the sentencepiece model (ids identical to it)."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=_fast_tokenizer_from_spm(Path(model_path)),
        pad_token=PAD,
        unk_token=UNK,
        bos_token=BOS,
        eos_token=EOS,
        extra_special_tokens=list(role_tokens),
        chat_template=chat_template,
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )


def train_tokenizer(
    texts: Iterable[str],
    out_dir: str | Path,
    *,
    vocab_size: int,
    role_tokens: Sequence[str],
    chat_template: str,
) -> Any:
    """Train, save to ``out_dir`` (HF files + ``tokenizer.model``) and return the tokenizer."""
    out_dir = Path(out_dir)
    model_path = train_sentencepiece(
        texts, out_dir / "tokenizer.model", vocab_size=vocab_size, user_symbols=role_tokens
    )
    tokenizer = build_hf_tokenizer(model_path, role_tokens=role_tokens, chat_template=chat_template)
    tokenizer.save_pretrained(str(out_dir))
    return tokenizer
