"""Which sentencepiece pieces carry semantic payload, for SGT's `payload` policy.

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
"""
from __future__ import annotations

import unicodedata

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


def content_pieces(tokenizer_model: str, vocab_size: int) -> np.ndarray:
    """Bool [vocab_size]: True where the piece is payload. Ids past the tokenizer (padding) are not."""
    refuse_other_tokenizers(tokenizer_model)
    sp = spm.SentencePieceProcessor(model_file=tokenizer_model)
    out = np.zeros(vocab_size, dtype=bool)
    for i in range(min(vocab_size, sp.get_piece_size())):
        out[i] = not is_function_piece(sp.id_to_piece(i), sp.is_control(i) or sp.is_unknown(i), sp.is_byte(i))
    return out


def refuse_other_tokenizers(tokenizer_model: str) -> None:
    """The rule reads sentencepiece pieces (the word-start mark, byte pieces, Korean particles merged into
    pieces); a byte-level BPE's pieces (SmolLM2's `Ġ`-prefixed English/code vocabulary) would be classified
    by accident, so the policy refuses them rather than guess."""
    from cherry_megatron.data.tokenizer import kind
    from cherry_megatron.errors import ConfigError

    if kind(tokenizer_model) != "sentencepiece":
        raise ConfigError(f"sgt.policy=payload needs a sentencepiece tokenizer (its content rule is written for "
                          f"sentencepiece pieces); {tokenizer_model} is a Hugging Face tokenizer: use "
                          "sgt.policy=frequency, random, loss or excess")
