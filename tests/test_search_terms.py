"""`search.terms`: how a --tag term is normalised and which synsets it names."""

from search import terms


def test_terms_are_case_insensitive_and_spaces_are_underscores():
    assert terms.normalise("  Golden   Retriever ") == "golden_retriever"
    assert terms.lemmas("dog, domestic_dog, Canis_familiaris") == [
        "dog",
        "domestic_dog",
        "canis_familiaris",
    ]
    assert terms.display_name("tabby, tabby_cat") == "tabby"


def test_vocabulary_has_the_wnid_and_every_lemma_and_keeps_homonyms_apart():
    vocab = terms.vocabulary(
        [("n02012849", "crane"), ("n03126707", "crane"), ("n02121808", "domestic_cat, house_cat")]
    ).to_pylist()
    by_term = {}
    for row in vocab:
        by_term.setdefault(row["term"], []).append(row["wnid"])
    assert by_term == {
        "crane": ["n02012849", "n03126707"],
        "n02012849": ["n02012849"],
        "n03126707": ["n03126707"],
        "domestic_cat": ["n02121808"],
        "house_cat": ["n02121808"],
        "n02121808": ["n02121808"],
    }


def test_label_set_knows_every_class_by_wnid_and_lemma():
    assert terms.label_set_synsets("n02099601") == [("n02099601", "golden_retriever")]
    assert [w for w, _ in terms.label_set_synsets("Crane")] == ["n02012849", "n03126707"]
    assert terms.label_set_synsets("no_such_thing") == []


def test_sql_list_quotes_values():
    assert terms.sql_list(["a", "it's"]) == "['a', 'it''s']"
