"""A vector store records the model it was made with as the hub id, whatever spelling the
user typed: a short name and its hub id must not look like two models."""

from blip2cli.embed import model_key


def test_short_name_is_recorded_as_its_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert model_key("itm") == "Salesforce/blip2-itm-vit-g" == model_key("Salesforce/blip2-itm-vit-g")


def test_a_local_folder_named_like_a_short_name_wins(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "itm").mkdir()
    assert model_key("itm") == str(tmp_path / "itm")
