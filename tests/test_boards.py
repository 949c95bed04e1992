"""Board profiles: the packaged JSON data and the device-tree matching built on it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from rkedge.boards import SYSFS, BoardProfile, get_board, load_boards, match_board, soc_from_compatible
from rkedge.errors import InputError

BOARDS_DIR = Path(__file__).resolve().parent.parent / "boards"
JSON_FILES = sorted(BOARDS_DIR.glob("*.json"))

#: key -> allowed JSON types (None = null allowed).
SCHEMA: dict[str, tuple[type | None, ...]] = {
    "id": (str,),
    "name": (str,),
    "vendor": (str,),
    "soc": (str,),
    "npu_platform": (str,),
    "ram_gb": (list, None),
    "ram_verified": (bool,),
    "memory_type": (str, None),
    "memory_type_verified": (bool,),
    "memory_bandwidth_gbs": (float, int, None),
    "device_tree": (dict,),
    "mainline_npu_enabled": (bool, None),
    "notes": (str,),
    "sources": (list,),
}

#: The boards boards.md section 1 lists, by the ids their files use.
EXPECTED_IDS = {
    "orangepi-5", "orangepi-5b", "orangepi-5-plus", "orangepi-5-pro", "orangepi-5-max", "orangepi-5-ultra",
    "rock-5a", "rock-5b", "rock-5b-plus", "rock-5c", "rock-5-itx", "nanopc-t6", "nanopc-t6-lts", "nanopi-r6s",
    "nanopi-r6c", "cm3588-nas", "khadas-edge2", "turing-rk1", "mixtile-blade3", "bananapi-m7",
    "firefly-station-m3", "coolpi-4b", "coolpi-cm5", "armsom-sige7", "armsom-w3",
}


def _type_ok(value: Any, allowed: tuple[type | None, ...]) -> bool:
    if value is None:
        return None in allowed
    if isinstance(value, bool):
        return bool in allowed
    return any(t is not None and isinstance(value, t) for t in allowed)


def _raw(path: Path) -> dict[str, Any]:
    data = json.loads(path.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def test_every_listed_board_has_a_file() -> None:
    assert {p.stem for p in JSON_FILES} == EXPECTED_IDS


@pytest.mark.parametrize("path", JSON_FILES, ids=lambda p: p.stem)
def test_json_has_every_key_with_the_right_type(path: Path) -> None:
    data = _raw(path)
    assert set(data) == set(SCHEMA), f"{path.name}: keys differ from the schema"
    for key, allowed in SCHEMA.items():
        assert _type_ok(data[key], allowed), f"{path.name}: {key}={data[key]!r}"
    assert data["id"] == path.stem
    if data["ram_gb"] is not None:
        assert data["ram_gb"] and all(type(x) is int and x > 0 for x in data["ram_gb"])
        assert data["ram_gb"] == sorted(set(data["ram_gb"]))
    assert data["soc"] in {"rk3588", "rk3588s", "rk3588s2", "rk3582"}
    assert data["npu_platform"] == "rk3588"
    assert data["sources"] and all(isinstance(s, str) and s for s in data["sources"])
    assert set(data["device_tree"]) == {"mainline", "vendor"}
    known = [ids for ids in data["device_tree"].values() if ids is not None]
    assert known, f"{path.name}: no device-tree strings at all"
    for ids in known:
        assert set(ids) == {"model", "compatible"}
        assert ids["model"] and all(isinstance(m, str) and m for m in ids["model"])
        # Every identity names the SoC, and at least one string that is specific to the board.
        assert any(c.startswith("rockchip,rk35") and "-" not in c for c in ids["compatible"])
        assert any(not (c.startswith("rockchip,rk35") and "-" not in c) for c in ids["compatible"])
    # An unknown memory type cannot have a verified type or a bandwidth derived from it.
    if data["memory_type"] is None:
        assert data["memory_type_verified"] is False
        assert data["memory_bandwidth_gbs"] is None


def test_loader_returns_every_file_as_a_profile_with_unique_ids() -> None:
    boards = load_boards()
    ids = [b.id for b in boards]
    assert len(ids) == len(set(ids)) == len(JSON_FILES)
    assert set(ids) == {p.stem for p in JSON_FILES}
    assert all(isinstance(b, BoardProfile) for b in boards)


def test_loader_converts_json_into_typed_values() -> None:
    board = get_board("orangepi-5")
    assert board.ram_gb == (4, 8, 16)
    assert board.memory_bandwidth_gbs == pytest.approx(33.79)
    assert board.device_tree.vendor is not None
    assert board.device_tree.vendor.compatible == ("rockchip,rk3588s-orangepi-5", "rockchip,rk3588")
    with pytest.raises(AttributeError):
        board.id = "other"  # type: ignore[misc]
    # A caller mutating the returned list does not change what the next call returns.
    boards = load_boards()
    boards.clear()
    assert len(load_boards()) == len(JSON_FILES)


def test_no_two_boards_share_a_model_or_a_board_specific_compatible() -> None:
    seen_models: dict[str, str] = {}
    seen_compat: dict[str, str] = {}
    for board in load_boards():
        for model in board.models:
            assert model not in seen_models, f"{model!r}: {seen_models.get(model)} and {board.id}"
            seen_models[model] = board.id
        for entry in board.board_compatibles:
            assert entry not in seen_compat, f"{entry!r}: {seen_compat.get(entry)} and {board.id}"
            seen_compat[entry] = board.id


def test_match_orange_pi_5_by_mainline_model() -> None:
    board = match_board("Xunlong Orange Pi 5", ["xunlong,orangepi-5", "rockchip,rk3588s"])
    assert board is not None and board.id == "orangepi-5"


def test_match_orange_pi_5_by_model_alone_with_trailing_nul() -> None:
    board = match_board("Xunlong Orange Pi 5\x00", [])
    assert board is not None and board.id == "orangepi-5"


def test_match_orange_pi_5_by_vendor_compatible() -> None:
    # Unknown model spelling: the vendor compatible list alone must identify the board, even though its
    # board-specific entry starts with "rockchip,rk3588".
    board = match_board("some vendor image", ["rockchip,rk3588s-orangepi-5", "rockchip,rk3588"])
    assert board is not None and board.id == "orangepi-5"


def test_match_orange_pi_5_plus_is_not_confused_with_orange_pi_5() -> None:
    board = match_board(None, ["xunlong,orangepi-5-plus", "rockchip,rk3588"])
    assert board is not None and board.id == "orangepi-5-plus"


@pytest.mark.parametrize("model", ["Radxa ROCK 5B", "Radxa ROCK 5 Model B"])
def test_match_rock_5b_by_both_model_spellings(model: str) -> None:
    board = match_board(model, [])
    assert board is not None and board.id == "rock-5b"


def test_model_match_wins_over_compatible() -> None:
    board = match_board("Radxa ROCK 5B", ["radxa,rock-5a", "rockchip,rk3588s"])
    assert board is not None and board.id == "rock-5b"


def test_first_board_specific_compatible_wins() -> None:
    board = match_board(None, ["friendlyarm,cm3588-nas", "friendlyarm,cm3588", "rockchip,rk3588"])
    assert board is not None and board.id == "cm3588-nas"
    # An unknown carrier for a known SoM still resolves through the SoM-level entry.
    board = match_board("Some CM5 carrier", ["coolpi,pi-cm5-other", "coolpi,pi-cm5", "rockchip,rk3588"])
    assert board is not None and board.id == "coolpi-cm5"


def test_no_match_for_a_raspberry_pi() -> None:
    assert match_board("Raspberry Pi 4 Model B", ["raspberrypi,4-model-b", "brcm,bcm2711"]) is None


@pytest.mark.parametrize("compatible", [["rockchip,rk3588"], ["rockchip,rk3588s"], ["rockchip,rk3588s", "rockchip,rk3588"]])
def test_no_match_for_generic_only_compatible(compatible: list[str]) -> None:
    assert match_board(None, compatible) is None
    assert match_board("Unknown RK3588 board", compatible) is None


def test_no_match_for_nothing() -> None:
    assert match_board(None, []) is None
    assert match_board("", []) is None


@pytest.mark.parametrize(
    ("compatible", "soc"),
    [
        (["xunlong,orangepi-5", "rockchip,rk3588s"], "rk3588s"),
        (["rockchip,rk3588s-orangepi-5", "rockchip,rk3588"], "rk3588"),
        (["radxa,rock-5b", "rockchip,rk3588"], "rk3588"),
        (["some,rk3576-board", "rockchip,rk3576"], "rk3576"),
        (["radxa,rock3c", "rockchip,rk3566"], "rk3566"),
        (["rockchip,rk3588\x00"], "rk3588"),
        (["raspberrypi,4-model-b", "brcm,bcm2711"], None),
        ([], None),
    ],
)
def test_soc_from_compatible(compatible: list[str], soc: str | None) -> None:
    assert soc_from_compatible(compatible) == soc


def test_get_board_returns_the_profile() -> None:
    board = get_board("rock-5b")
    assert board.name == "Radxa ROCK 5B"
    assert board.soc == "rk3588"


def test_get_board_unknown_raises_input_error_listing_ids() -> None:
    with pytest.raises(InputError) as info:
        get_board("nope")
    assert "nope" in info.value.message
    assert info.value.fix is not None
    assert "orangepi-5" in info.value.fix and "rock-5b" in info.value.fix
    assert info.value.exit_code == 2


def test_sysfs_paths_cover_the_three_cpufreq_policies_and_the_rknpu_nodes() -> None:
    policies = SYSFS["cpufreq_policies"]
    assert sorted(policies) == ["policy0", "policy4", "policy6"]
    assert all(path.startswith("/sys/devices/system/cpu/cpufreq/policy") for path in policies.values())
    cpus = [cpu for group in SYSFS["cpufreq_policy_cpus"].values() for cpu in group]
    assert sorted(cpus) == list(range(8))
    assert SYSFS["npu_devfreq"] == "/sys/class/devfreq/fdab0000.npu"
    assert SYSFS["dmc_devfreq"] == "/sys/class/devfreq/dmc"
    assert SYSFS["rknpu_version_debugfs"] == "/sys/kernel/debug/rknpu/version"
    assert SYSFS["rknpu_version_module"] == "/sys/module/rknpu/version"


# --- board fit (rkedge.fit): the verdicts plan, convert and doctor share ------------------------------------------

def test_memory_verdict_boundaries() -> None:
    from rkedge import fit

    usable = fit.usable_bytes(8)
    assert usable == 8 * fit.GIB - fit.SYSTEM_RESERVE_BYTES
    assert fit.memory_verdict(fit.COMFORT_SHARE * usable, usable) == "fits"
    assert fit.memory_verdict(fit.COMFORT_SHARE * usable + 1, usable) == "tight"
    assert fit.memory_verdict(usable, usable) == "tight"
    assert fit.memory_verdict(usable + 1, usable) == "does not fit"


def test_npu_iommu_and_driver_rules() -> None:
    from rkedge import fit

    assert fit.iommu_domains(1) == 1 and fit.iommu_domains(fit.IOMMU_DOMAIN_BYTES + 1) == 2
    assert not fit.spans_iommu_domains(fit.IOMMU_DOMAIN_BYTES) and fit.spans_iommu_domains(fit.IOMMU_DOMAIN_BYTES + 1)
    big = fit.DRIVER_GATE_BYTES + 1
    assert fit.driver_cannot_map("0.9.6", big) and not fit.driver_cannot_map("0.9.8", big)
    assert not fit.driver_cannot_map("0.9.6", fit.DRIVER_GATE_BYTES) and not fit.driver_cannot_map(None, big)
    assert [fit.driver_verdict(v) for v in ("0.8.2", "0.9.6", "0.9.7", "0.9.8", "0.9.8b1", "0.10.0")] == \
        ["fail", "warn", "warn", "ok", "ok", "ok"]
    assert set(fit.SOURCES) >= {"COMFORT_SHARE", "IOMMU_DOMAIN_BYTES", "DRIVER_GATE_BYTES", "DRIVER_FAIL_BELOW"}
