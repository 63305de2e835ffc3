"""ComfyUI's ``embedding:NAME`` is written as the token ``<NAME>`` a declared embedding is loaded
under (issue 26); undeclared names and other text are left alone."""

from sdbatch.data.loras import embedding_tokens


def test_embedding_names_become_their_tokens():
    assert embedding_tokens("a embedding:foo cat, embedding:foo.safetensors", ["foo"]) == "a <foo> cat, <foo>"
    assert embedding_tokens("(embedding:EasyNegative:1.2)", ["EasyNegative"]) == "(<EasyNegative>:1.2)"


def test_other_text_is_left_alone():
    assert embedding_tokens("embedding:food embedding:bar <foo>", ["foo"]) == "embedding:food embedding:bar <foo>"
    assert embedding_tokens("embedding:foo", []) == "embedding:foo"
