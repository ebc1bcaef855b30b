"""Out-of-domain prompts: one warning naming the words a narrow model never saw (CLI, API, server)."""

from __future__ import annotations

import json
import warnings

import pytest

from openldm import cli
from openldm.client import RemoteRenderer
from openldm.data.phrasing import vocabulary
from openldm.models.domain import DOMAIN_FILE, Domain, DomainWarning, read_domain
from openldm.models.embedded import default_model_path
from openldm.pipelines.params import GenerationParams
from openldm.server.config import ServerConfig
from tests.server_helpers import Served

pytestmark = pytest.mark.usefixtures("one_thread")
CAT = "a photograph of a cat sitting on a sofa"
IN_DOMAIN = "Red circle, left, on a blue background"  # free phrasing, but every word one it was taught
CAT_WARNING = ("the embedded model knows only simple coloured shapes; it does not know: "
               "cat, of, photograph, sitting, sofa")
FAST = ["--steps", "2", "--seed", "3"]


def test_the_warning_names_each_unknown_word_once_sorted():
    domain = Domain("the embedded model knows only simple coloured shapes", vocabulary("template"))
    assert domain.warning([CAT, "A CAT <lora:cat:0.5> (sofa:1.2) BREAK"]) == CAT_WARNING
    assert domain.unknown([IN_DOMAIN]) == [] and domain.warning([IN_DOMAIN]) == ""
    assert domain.unknown(["a big circle in the middle"]) == ["big", "middle"]  # new grammar only
    assert Domain("x", vocabulary("varied")).unknown(["a big circle in the middle"]) == []


def test_the_shipped_model_declares_the_words_of_its_training_captions(tmp_path):
    domain = read_domain(default_model_path())
    assert domain is not None and domain.words == vocabulary("varied")  # fine-tuned on the grammar
    vocab = json.loads((default_model_path() / "tokenizer" / "vocab.json").read_text())
    whole_words = {t[:-4] for t in vocab if t.endswith("</w>") and t[:-4] in domain.words}
    assert whole_words == vocabulary("varied")  # every word of the grammar is one token (the vocabulary
    # of its first, template-only training, grown by ldm.extend_vocabulary for the grammar's new words)
    assert read_domain(tmp_path) is None
    (tmp_path / DOMAIN_FILE).write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a domain file"):
        read_domain(tmp_path)


@pytest.fixture(scope="module")
def pipe():
    from openldm.pipelines.loading import load

    return load(default_model_path())


def test_the_python_api_warns_once_for_a_cat_and_not_for_shapes(pipe):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        for _ in range(3):
            pipe.txt2img(CAT, steps=1, seed=1)
        pipe.txt2img(IN_DOMAIN, steps=1, seed=1)
    messages = [str(w.message) for w in caught if w.category is DomainWarning]
    assert messages == [CAT_WARNING]
    assert caught[0].filename == __file__  # it points at the caller's line


def test_the_cli_warns_once_per_run_and_still_writes_the_images(tmp_path, capsys):
    out = tmp_path / "cat.png"
    assert cli.main(["txt2img", CAT, "--n-iter", "3", "-o", str(out), *FAST]) == 0
    err = capsys.readouterr().err
    assert err.count("does not know") == 1 and f"warning: {CAT_WARNING}" in err
    assert len(list(tmp_path.glob("*.png"))) == 3
    assert cli.main(["txt2img", IN_DOMAIN, "-o", str(tmp_path / "ok.png"), *FAST]) == 0
    assert "does not know" not in capsys.readouterr().err


def test_the_server_sends_the_same_warning(tmp_path):
    served = Served(ServerConfig(data_dir=tmp_path, default_model=default_model_path()))
    try:
        client = RemoteRenderer(served.url)
        cat = client.render("txt2img", GenerationParams(CAT, steps=1, seed=2))
        shapes = client.render("txt2img", GenerationParams(IN_DOMAIN, steps=1, seed=2))
    finally:
        served.close()
    assert [r.warning for r in cat] == [CAT_WARNING] and cat[0].png.startswith(b"\x89PNG")
    assert [r.warning for r in shapes] == [""]
