"""Settings: validation with clear messages, and dict / infotext round trips (one definition for API, UI, infotext)."""

import dataclasses

import pytest

from loratorio.core import ARG_ORDER, Settings, settings_from_args


def test_defaults_are_valid_and_disabled():
    s = Settings()
    assert not s.enabled and s.mode == "loratorio" and s.recentre == 0.5


@pytest.mark.parametrize("field,value,needle", [
    ("patch_size", 0, r"'patch_size' must be in \[1, 128\]"),
    ("temperature", 0.0, "'temperature' must be in"),
    ("temperature", float("nan"), "'temperature' must be in"),
    ("recentre", 1.5, "'recentre' must be in"),
    ("top_k", -1, "'top_k' must be in"),
    ("reuse", 101, r"'reuse' must be in \[0, 100\]"),
    ("mode", "merge", "'mode' must be one of"),
    ("reference", "x", "'reference' must be one of"),
    ("evaluation", "fast", "'evaluation' must be one of"),
    ("speed", "turbo", "'speed' must be one of"),
    ("full_every", 0, r"'full_every' must be in \[1, 100\]"),
    ("patch_size", 2.5, "'patch_size' must be a int"),
    ("enabled", "yes", "'enabled' must be a bool"),
    ("patch_size", True, "'patch_size' must be a int"),
])
def test_bad_values_name_the_field(field, value, needle):
    with pytest.raises(ValueError, match=needle):
        Settings.from_dict({field: value})


def test_start_must_precede_end():
    with pytest.raises(ValueError, match="'start'"):
        Settings(start=0.6, end=0.5)


def test_unknown_key_is_an_error():
    with pytest.raises(ValueError, match="unknown LoRAtorio setting"):
        Settings.from_dict({"patchsize": 4})


def test_dict_round_trip_and_coercion():
    s = Settings.from_dict({"enabled": True, "patch_size": 4.0, "temperature": "0.1", "mode": "Composite"})
    assert (s.patch_size, s.temperature, s.mode) == (4, 0.1, "composite")
    assert Settings.from_dict(s.to_dict()) == s
    assert Settings.from_dict({}) == Settings()


def test_infotext_round_trip():
    s = Settings(enabled=True, mode="switch", patch_size=4, temperature=0.125, recentre=0.3, top_k=2,
                 reference="uncond", evaluation="sequential", switch_interval=3, start=0.1, end=0.9, reuse=3,
                 speed="fast", full_every=5)
    text = s.to_infotext()
    assert text["LoRAtorio patch size"] == "4" and text["LoRAtorio temperature"] == "0.125"
    assert text["LoRAtorio reuse steps"] == "3"
    assert text["LoRAtorio speed"] == "fast" and text["LoRAtorio full every"] == "5"
    assert all(isinstance(v, str) for v in text.values())
    assert Settings.from_infotext(text) == s
    assert Settings.from_infotext({"Steps": "20"}) == Settings()
    assert Settings(patch_size=4).to_infotext() == {}


def test_every_field_reaches_the_infotext_or_is_ui_only():
    keys = Settings(enabled=True, global_loras="style").to_infotext()
    names = {f.name for f in dataclasses.fields(Settings)}
    assert len(keys) == len(names - {"enabled", "show_maps"})
    # An empty string is left out (A1111 cannot parse "key: "), and restores as the default.
    assert "LoRAtorio global LoRAs" not in Settings(enabled=True).to_infotext()
    assert Settings.from_infotext(Settings(enabled=True).to_infotext()) == Settings(enabled=True)


def test_speed_settings_come_after_reuse_in_the_positional_order():
    from loratorio.core import ARG_ORDER, settings_from_args

    assert ARG_ORDER[ARG_ORDER.index("reuse") + 1:ARG_ORDER.index("reuse") + 3] == ("speed", "full_every")
    s = settings_from_args([True, "loratorio", 8, 0.05, 0.5, 0, "cond", "auto", 5, 0.0, 1.0, False, 0, "fast", 6])
    assert (s.speed, s.full_every) == ("fast", 6)
    assert settings_from_args([True]).speed == Settings().speed


def test_global_loras_are_names_matched_case_insensitively():
    s = Settings.from_dict({"global_loras": " Watercolor , ,lineart "})
    assert s.global_list() == ("watercolor", "lineart")
    items = [("knight", "Knight_v2"), ("watercolor", None), ("hat", "hat")]
    glob, rest, missing = s.split_globals(items, lambda item: item)
    assert glob == [items[1]] and rest == [items[0], items[2]] and missing == ["lineart"]
    assert Settings().split_globals(items, lambda item: item) == ([], items, [])


def test_new_settings_round_trip_through_infotext_and_positional_args():
    s = Settings(enabled=True, global_loras="style_a,style_b", min_share=0.1)
    text = s.to_infotext()
    assert text["LoRAtorio global LoRAs"] == "style_a,style_b" and text["LoRAtorio min share"] == "0.1"
    assert Settings.from_infotext(text) == s
    positional = [getattr(s, name) for name in ARG_ORDER]
    assert settings_from_args(positional) == s
    with pytest.raises(ValueError, match="'min_share' must be in"):
        Settings(min_share=1.5)


def test_an_infotext_from_before_relative_existed_restores_it_off():
    old = {k: v for k, v in Settings(enabled=True, relative=False).to_infotext().items() if "relative" not in k}
    assert Settings.from_infotext(old).relative is False
    assert Settings.from_infotext(Settings(enabled=True).to_infotext()).relative is True
    assert Settings.from_infotext({}) == Settings()
