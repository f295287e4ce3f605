"""Which tokenizer pieces carry semantic payload, for SGT's `payload` policy.

The CHERRY report supervises "the tokens that carry semantic payload" without giving its rule; ours:
a piece is a *function* piece, not payload, when its text (the leading ▁ word marker removed) is
  1. empty or whitespace, or a control/unknown piece, or a byte-fallback piece for an ASCII byte that
     is not a letter or digit (newline, tab, punctuation bytes);
  2. only punctuation and symbols (Unicode categories P* and S*): `.`, `()`, `=`, `#`...;
  3. a Korean particle (조사), verb ending (어미), copula/auxiliary predicate form or bound noun from
     `KOREAN_FUNCTION` below. Korean is agglutinative: our tokenizer usually merges a particle into
     its word (`▁협약을`), and such pieces stay payload because their stem carries the meaning; only
     pieces that are *nothing but* grammar (`하여야`, `▁한다`, `은`) are excluded;
  4. an English function word (articles, prepositions, pronouns, auxiliaries: `ENGLISH_FUNCTION`).
Everything else is payload (content stems, names, numbers, code identifiers, non-ASCII bytes of rare
characters). The list is short on purpose: a few hundred of the most frequent grammatical strings
cover most function-piece occurrences in the corpus (the SGT report measures the share).

A Hugging Face tokenizer gets the same rules on its pieces' text. A byte-level BPE (GPT-2's, SmolLM2's: `Ġ`
marks a space, every piece is a byte string) is read back to bytes first: a piece that decodes to text is
judged by its text (the leading space stripped as the ▁ is), and a piece that is a fragment of a multi-byte
character is payload, as sentencepiece's non-ASCII byte pieces are. So in SmolLM2's English/code vocabulary,
Korean (about two pieces a syllable) is payload almost throughout: a particle is recognized only where the BPE
holds it whole (`의`, `는`). Special tokens (`<|im_end|>`...) are function pieces.
"""
from __future__ import annotations

import json
import re
import unicodedata
from functools import lru_cache

import numpy as np
import sentencepiece as spm

KOREAN_FUNCTION = set("""
이 가 을 를 은 는 의 에 에서 에게 께 께서 한테 로 으로 와 과 도 만 까지 부터 보다 처럼 같이 마다 조차 밖에
이나 나 라도 이라도 든지 이든지 랑 이랑 하고 에는 에서는 으로는 로는 에도 에서도 과의 와의 에의 로서 으로서
로써 으로써 이란 란 이라 라 이며 며 이고 고 이다 다 입니다 니다 습니다 ㅂ니다 합니다 한다 하다 했다 하였다
하여 해야 하여야 하는 하고 하며 하면 하기 하지 해 해서 하였 했 할 한 함 하게 하도록 하거나 하여서 한다면
되는 된다 됩니다 되어 되며 되면 되고 되지 된 될 됨 되었다 되도록 되어야 있다 있는 있으며 있고 있습니다 있어
있을 없는 없다 없이 없습니다 것 것을 것은 것이 것으로 것이다 수 수도 등 등을 등의 등은 및 또는 그 이 저 그리고
그러나 또한 따라 따른 따라서 의한 의하여 대한 대하여 위한 위하여 관한 관하여 통해 통하여 경우 경우에는 때 때에는
요 어요 아요 세요 십시오 시오 으며 면 으면 서 어서 아서 니까 지만 는데 기 게 지 음 인 일 임 였다 었다 았다 겠
""".split())

ENGLISH_FUNCTION = set("""
a an the and or but if then else of to in on at by for with from as into onto over under about than
is are was were be been being am do does did done has have had having will would shall should can could
may might must it its this that these those there here which who whom whose what when where why how
i me my we our you your he him his she her they them their not no nor so too very also just only
all any each both such other some more most own same s t
""".split())


def is_function_piece(piece: str, is_control: bool = False, is_byte: bool = False) -> bool:
    if is_control:
        return True
    if is_byte:  # "<0x0A>": function when it is an ASCII byte that is not a letter or digit
        value = int(piece[3:-1], 16)
        return value < 0x80 and not chr(value).isalnum()
    text = piece.replace("\u2581", " ").strip()
    if not text:
        return True
    if all(unicodedata.category(ch)[0] in "PS" for ch in text):
        return True
    return text in KOREAN_FUNCTION or text.lower() in ENGLISH_FUNCTION


def is_function_bytes(raw: bytes) -> bool:
    """A byte-level BPE piece (its bytes): judged by its text, or payload when it is part of a character."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return False  # a fragment of a multi-byte character: part of a letter, like a non-ASCII byte piece
    return is_function_piece(text.replace(" ", "\u2581"))


@lru_cache(maxsize=1)
def byte_decoder() -> dict:
    """GPT-2's byte-level alphabet, printable character -> byte (the inverse of `bytes_to_unicode`): each of the
    256 bytes has a visible stand-in so a BPE vocabulary is text; `Ġ` is the space."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    shifted, extra = [], 0
    for b in range(256):
        if b not in keep:
            shifted.append((chr(256 + extra), b))
            extra += 1
    return {**{chr(b): b for b in keep}, **dict(shifted)}


def content_pieces(tokenizer_model: str, vocab_size: int) -> np.ndarray:
    """Bool [vocab_size]: True where the piece is payload. Ids past the tokenizer (padding) are not."""
    from cherry_megatron.data.tokenizer import kind, tokenizer_file

    out = np.zeros(vocab_size, dtype=bool)
    if kind(tokenizer_model) == "huggingface":
        for i, piece, special, byte_level in hf_pieces(tokenizer_file(tokenizer_model)):
            if i < vocab_size:
                if byte_level and not special and all(ch in byte_decoder() for ch in piece):
                    out[i] = not is_function_bytes(bytes(byte_decoder()[ch] for ch in piece))
                else:
                    byte = re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", piece) is not None
                    out[i] = not is_function_piece(piece, special, byte)
        return out
    sp = spm.SentencePieceProcessor(model_file=tokenizer_model)
    for i in range(min(vocab_size, sp.get_piece_size())):
        out[i] = not is_function_piece(sp.id_to_piece(i), sp.is_control(i) or sp.is_unknown(i), sp.is_byte(i))
    return out


def hf_pieces(path: str):
    """(id, piece, is special, is byte-level) of every piece in a tokenizer.json: the model's vocabulary and the
    added tokens. Byte-level when its pre-tokenizer or decoder is ByteLevel (anywhere in a sequence of them)."""
    with open(path, encoding="utf-8") as f:
        spec = json.load(f)
    blob = json.dumps([spec.get("pre_tokenizer"), spec.get("decoder")])
    byte_level = '"ByteLevel"' in blob
    added = {t["id"]: t for t in spec.get("added_tokens", [])}
    vocab = spec.get("model", {}).get("vocab", {})
    items = vocab.items() if isinstance(vocab, dict) else ((p[0], i) for i, p in enumerate(vocab))  # Unigram: list
    seen = set()
    for piece, i in items:
        seen.add(i)
        yield i, piece, i in added and added[i].get("special", False), byte_level
    for i, t in added.items():
        if i not in seen:
            yield i, t["content"], t.get("special", False), False
