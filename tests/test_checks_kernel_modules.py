"""checks/kernel_modules.py against kernels recorded from focal (generic 5.4 from a booted
image, linux-kvm 5.4 from its linux-modules package): see tests/data/kmod/record.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from .guest import guest_module

ROOT = Path(__file__).resolve().parents[1]


km = guest_module("kernel_modules")

DATA = ROOT / "tests" / "data" / "kmod"
GENERIC = DATA / "5.4.0-216-generic"
KVM = DATA / "5.4.0-1133-kvm"
RESOLUTE = DATA / "7.0.0-44-generic"  # 26.04: zstd-compressed modules, more built in
# Each release's generic kernel (linux-image-virtual): booted (5.4, 7.0) or from its unpacked
# linux-modules package after depmod -b (5.15, 6.8; nothing loaded).
RELEASE_KERNELS = {
    "20.04": DATA / "5.4.0-216-generic",
    "22.04": DATA / "5.15.0-204-generic",
    "24.04": DATA / "6.8.0-151-generic",
    "26.04": RESOLUTE,
}
SPEC = yaml.safe_load((ROOT / "images" / "ubuntu-20.04.yaml").read_text())["checks"]
REQUIRED = SPEC["kernel_modules"]["required"]
OPTIONAL = SPEC["kernel_modules"]["optional"]
STALE = ["xfrm4_mode_tunnel", "xfrm6_mode_tunnel", "tunnel", "xfrm4_tunnel", "ip_tunnel"]


def facts_for(
    kernel: Path,
    config: str = "",
    *,
    loaded: bool = True,
    disabled: bool = False,
    cmdline: str = "",
    release: str | None = None,
) -> km.KernelFacts:
    """KernelFacts from a recorded kernel, as gather_facts() builds them in the guest."""
    proc_modules = kernel / "proc_modules"
    return km.KernelFacts(
        release=release or (kernel / "release").read_text().strip(),
        builtin=km.parse_builtin((kernel / "modules.builtin").read_text()),
        builtin_aliases=km.parse_builtin_aliases((kernel / "modules.builtin.modinfo").read_text()),
        aliases=km.parse_modules_alias((kernel / "modules.alias").read_text()),
        modules=km.parse_modules_dep((kernel / "modules.dep").read_text()),
        config=km.parse_modprobe_config([("/etc/modprobe.d/test.conf", config)]),
        loaded=km.parse_proc_modules(proc_modules.read_text())
        if loaded and proc_modules.exists()
        else set(),
        cmdline_blacklist=km.parse_cmdline_blacklist(cmdline),
        modules_disabled=disabled,
    )


def recorded_probe(*files: Path):
    """modprobe --show-depends as recorded; later files override earlier ones. A module that
    was never recorded is a test bug, not a missing module."""
    outputs: dict[str, list] = {}
    for path in files:
        outputs.update(json.loads(path.read_text()))
    probed: list[str] = []

    def probe(module: str) -> tuple[int, str, str]:
        probed.append(module)
        code, out, err = outputs[module]
        return code, out, err

    probe.probed = probed  # type: ignore[attr-defined]
    return probe


def statuses(outcome: km.Assessment, part: str) -> dict[str, str]:
    return {name: entry["status"] for name, entry in outcome.data[part].items()}


def test_generic_kernel_has_every_capability() -> None:
    facts = facts_for(GENERIC)
    outcome = km.assess(REQUIRED, OPTIONAL, facts, recorded_probe(GENERIC / "show-depends.json"))

    assert outcome.ok, outcome.detail
    required = statuses(outcome, "required")
    assert required["cbc"] == required["gcm"] == required["sha256"] == km.BUILT_IN
    assert required["aes"] == km.BUILT_IN  # aes_generic, not the CPU-specific aesni_intel
    assert outcome.data["required"]["aes"]["module"] == "aes_generic"
    assert outcome.data["required"]["ghash"]["module"] == "ghash_generic"
    assert required["xfrm_user"] == required["af_key"] == km.LOADED
    assert required["esp4"] == required["esp6"] == required["xt_policy"] == km.LOADABLE
    assert outcome.data["optional_missing"] == []
    assert "all 16 required capabilities available" in outcome.detail


def test_the_26_04_kernel_with_compressed_modules_has_every_capability() -> None:
    assert ".ko.zst" in (RESOLUTE / "modules.dep").read_text()
    facts = facts_for(RESOLUTE)
    assert {"esp4", "af_key", "xfrm_user"} <= facts.modules  # names, whatever the compression
    outcome = km.assess(REQUIRED, OPTIONAL, facts, recorded_probe(RESOLUTE / "show-depends.json"))

    assert outcome.ok, outcome.detail
    required = outcome.data["required"]
    assert required["esp4"]["module"] == "esp4" and required["af_key"]["module"] == "af_key"
    assert required["esp4"]["status"] in (km.LOADABLE, km.LOADED)
    assert required["af_key"]["status"] in (km.LOADABLE, km.LOADED)  # still a module in 7.0
    assert outcome.data["optional_missing"] == []


@pytest.mark.parametrize("release", list(RELEASE_KERNELS))
def test_every_releases_kernel_has_what_its_definition_requires(release: str) -> None:
    kernel = RELEASE_KERNELS[release]
    spec = yaml.safe_load((ROOT / "images" / f"ubuntu-{release}.yaml").read_text())["checks"]
    required, optional = spec["kernel_modules"]["required"], spec["kernel_modules"]["optional"]
    facts = facts_for(kernel)
    outcome = km.assess(required, optional, facts, recorded_probe(kernel / "show-depends.json"))
    assert outcome.ok, outcome.detail
    assert outcome.data["required"]["af_key"]["status"] != km.MISSING
    print(f"{release}: {outcome.detail}")


def test_kvm_kernel_has_the_essentials_but_not_the_extras() -> None:
    facts = facts_for(KVM)
    outcome = km.assess(REQUIRED, OPTIONAL, facts, recorded_probe(KVM / "show-depends.json"))

    assert outcome.ok, outcome.detail
    assert set(statuses(outcome, "required").values()) <= {km.BUILT_IN, km.LOADABLE}
    assert statuses(outcome, "required")["gcm"] == km.LOADABLE  # built in on generic
    missing = set(outcome.data["optional_missing"])
    assert {"xfrm_interface", "ip_vti", "chacha20poly1305"} <= missing
    assert missing == {"xfrm_interface", "ip_vti", "chacha20poly1305", "xcbc", "aesni_intel"}
    assert outcome.detail.endswith(
        "optional missing: xfrm_interface, ip_vti, chacha20poly1305, xcbc, aesni_intel"
    )
    assert outcome.data["optional"]["ip_vti"]["status"] == km.MISSING
    assert "not found" in outcome.data["optional"]["ip_vti"]["reasons"][0]


@pytest.mark.parametrize("kernel", [GENERIC, KVM, RESOLUTE], ids=["generic", "kvm", "7.0"])
def test_stale_strongswan_names_do_not_fail(kernel: Path) -> None:
    outcome = km.assess(STALE, [], facts_for(kernel), recorded_probe(kernel / "show-depends.json"))

    assert outcome.ok, outcome.detail
    assert outcome.data["required"]["xfrm4_mode_tunnel"]["status"] == km.BUILT_IN
    assert outcome.data["required"]["tunnel"]["module"] == "tunnel4"


def test_stale_names_are_real_modules_before_5_2() -> None:
    facts = facts_for(GENERIC, release="4.15.0-200-generic")
    probe = recorded_probe(GENERIC / "show-depends.json")
    verdict = km.judge_capability("xfrm4_mode_tunnel", facts, probe)

    assert not verdict.ok
    assert verdict.status == km.MISSING


@pytest.mark.parametrize(
    ("config", "cmdline", "failing", "reason"),
    [
        ("blacklist esp4\n", "", "esp4", "blacklisted in /etc/modprobe.d/test.conf"),
        ("blacklist xt-policy\n", "", "xt_policy", "blacklisted in"),
        ("install esp6 /bin/false\n", "", "esp6", "`install esp6 /bin/false`"),
        ("install xfrm_user /bin/true\n", "", "xfrm_user", "would not load again after a reboot"),
        ("install echainiv echo no\n", "", "echainiv", "does not load it"),
        (
            "",
            "ro module_blacklist=af_key,esp4",
            "esp4",
            "kernel command line (module_blacklist=)",
        ),
        ("", "quiet modprobe.blacklist=esp6", "esp6", "(modprobe.blacklist=)"),
    ],
)
def test_a_blocked_required_module_fails(
    config: str, cmdline: str, failing: str, reason: str
) -> None:
    facts = facts_for(GENERIC, config, cmdline=cmdline)
    outcome = km.assess(REQUIRED, OPTIONAL, facts, recorded_probe(GENERIC / "show-depends.json"))

    assert not outcome.ok
    assert reason in outcome.detail
    assert outcome.detail.startswith(f"{failing}:")
    assert reason in " ".join(outcome.data["required"][failing]["reasons"])


def test_blocking_a_built_in_module_changes_nothing() -> None:
    facts = facts_for(GENERIC, "blacklist cbc\ninstall gcm /bin/false\n")
    outcome = km.assess(REQUIRED, [], facts, recorded_probe(GENERIC / "show-depends.json"))

    assert outcome.ok, outcome.detail


def test_recorded_fault_configuration_fails_the_right_modules() -> None:
    """modprobe's real output under install/blacklist lines (fault/modprobe.conf)."""
    fault = GENERIC / "fault"
    facts = facts_for(GENERIC, (fault / "modprobe.conf").read_text(), loaded=False)
    probe = recorded_probe(GENERIC / "show-depends.json", fault / "show-depends.json")
    outcome = km.assess(["esp4", "esp6", "xfrm_user", "af_key", "aes"], [], facts, probe)

    assert not outcome.ok
    verdicts = outcome.data["required"]
    assert "`install esp4 /bin/false`" in verdicts["esp4"]["reasons"][0]
    assert "blacklisted in" in verdicts["esp6"]["reasons"][0]
    # xfrm_algo (a dependency) is replaced by /bin/true: xfrm_user and af_key cannot load.
    assert "dependency xfrm_algo" in verdicts["xfrm_user"]["reasons"][0]
    assert verdicts["af_key"]["reasons"] == [
        "dependency xfrm_algo replaced by `install … /bin/true`"
    ]
    assert verdicts["aes"]["status"] == km.BUILT_IN


def test_an_install_command_that_loads_the_module_is_fine() -> None:
    config = "install af_key /sbin/modprobe --ignore-install af_key $CMDLINE_OPTS && echo ok\n"
    fault = GENERIC / "fault"
    facts = facts_for(GENERIC, config, loaded=False)
    probe = recorded_probe(GENERIC / "show-depends.json", fault / "show-depends.json")
    # The recorded af_key plan also carries the xfrm_algo /bin/true line of fault/modprobe.conf;
    # here only af_key's own command is configured, so that line has no known owner.
    verdict = km.judge_module("af_key", facts, probe)
    assert verdict.reasons == ["modprobe would run `/bin/true` instead of loading it"]

    facts = facts_for(GENERIC, config, loaded=False)
    verdict = km.judge_module("af_key", facts, recorded_probe(GENERIC / "show-depends.json"))
    assert verdict.ok and verdict.status == km.LOADABLE


def test_modules_disabled_fails() -> None:
    facts = facts_for(GENERIC, disabled=True)
    outcome = km.assess(REQUIRED, OPTIONAL, facts, recorded_probe(GENERIC / "show-depends.json"))

    assert not outcome.ok
    assert outcome.detail.startswith("kernel.modules_disabled=1")
    assert outcome.data["modules_disabled"] == 1
    # Loaded and built-in capabilities still work; the loadable ones cannot load.
    assert outcome.data["required"]["xfrm_user"]["status"] == km.LOADED
    assert outcome.data["required"]["esp4"]["status"] == km.MISSING


def test_modules_disabled_fails_even_when_everything_is_present() -> None:
    facts = facts_for(GENERIC, disabled=True)
    outcome = km.assess(
        ["cbc", "xfrm_user"], [], facts, recorded_probe(GENERIC / "show-depends.json")
    )

    assert not outcome.ok


def test_only_a_cpu_specific_implementation_is_not_enough() -> None:
    """On a kernel with aes_generic as a blacklisted module, aesni_intel alone would only
    work on CPUs with AES-NI."""
    facts = facts_for(GENERIC, "blacklist aes_generic\n", loaded=False)
    facts.builtin.discard("aes_generic")
    facts.builtin_aliases = {k: v - {"aes_generic"} for k, v in facts.builtin_aliases.items()}
    facts.aliases.add("crypto_aes", "aes_generic")
    outputs = json.loads((GENERIC / "show-depends.json").read_text())
    outputs["aes_generic"] = [0, "insmod /lib/modules/x/kernel/crypto/aes_generic.ko \n", ""]

    verdict = km.judge_capability("aes", facts, lambda m: tuple(outputs[m]))  # type: ignore[arg-type,return-value]

    assert not verdict.ok
    assert verdict.reasons[0].startswith("only CPU-specific implementations")
    assert any("aes_generic missing: blacklisted" in r for r in verdict.reasons)
    # Asked for by name, the accelerated module itself is fine.
    assert km.judge_capability("aesni_intel", facts, lambda m: tuple(outputs[m])).ok  # type: ignore[arg-type,return-value]


def test_candidates_resolve_names_aliases_and_crypto_aliases() -> None:
    facts = facts_for(GENERIC)

    assert km.candidates("esp4", facts) == ["esp4"]
    assert km.candidates("xt-policy", facts) == ["xt_policy"]
    assert km.candidates("aes", facts) == ["aes_generic", "aesni_intel"]
    assert km.candidates("sha256", facts) == ["sha256_generic", "sha256_ssse3"]
    assert km.candidates("nonexistent", facts) == ["nonexistent"]


def test_config_aliases_come_first() -> None:
    facts = facts_for(GENERIC, "alias crypto-sha1 my_sha1\n")

    assert km.candidates("sha1", facts)[0] == "my_sha1"


# --- parsers -----------------------------------------------------------------------------


def test_normalize_keeps_dashes_inside_patterns() -> None:
    assert km.normalize("xfrm-type-2-50") == "xfrm_type_2_50"
    assert km.normalize("pci:v[0-9]d-x") == "pci:v[0-9]d_x"


def test_module_name_handles_compression_and_dashes() -> None:
    assert km.module_name("kernel/arch/x86/crypto/aesni-intel.ko") == "aesni_intel"
    assert km.module_name("/lib/modules/6.8.0-1-generic/kernel/net/ipv4/esp4.ko.zst") == "esp4"


def test_builtin_modinfo_aliases() -> None:
    text = "aes_generic.alias=crypto-aes\0aes_generic.license=GPL\0cbc.alias=cbc\0"
    assert km.parse_builtin_aliases(text) == {"crypto_aes": {"aes_generic"}, "cbc": {"cbc"}}


def test_modprobe_config_parsing() -> None:
    config = km.parse_modprobe_config(
        [
            ("/etc/modprobe.d/a.conf", "# c\nblacklist esp-4\ninstall af_key \\\n  /bin/false\n"),
            ("/lib/modprobe.d/b.conf", "install af_key /sbin/modprobe -i af_key\nalias foo bar\n"),
        ]
    )

    assert config.blacklist == {"esp_4": "/etc/modprobe.d/a.conf"}
    assert config.install == {"af_key": ("/bin/false", "/etc/modprobe.d/a.conf")}
    assert config.aliases == [("foo", "bar")]


def test_effective_config_files_precedence(tmp_path: Path) -> None:
    etc, lib = tmp_path / "etc", tmp_path / "lib"
    etc.mkdir()
    lib.mkdir()
    (etc / "b.conf").write_text("blacklist from-etc\n")
    (lib / "b.conf").write_text("blacklist hidden\n")
    (lib / "a.conf").write_text("blacklist from-lib\n")
    (lib / "c.txt").write_text("blacklist ignored\n")

    files = km.effective_config_files((str(etc), str(tmp_path / "none"), str(lib)))

    assert [Path(p).name for p, _ in files] == ["a.conf", "b.conf"]
    assert files[1] == (str(etc / "b.conf"), "blacklist from-etc\n")


@pytest.mark.parametrize(
    ("command", "loads"),
    [
        ("/bin/false", False),
        ("/bin/true", False),
        ("echo esp4 is disabled", False),
        ("/sbin/modprobe --ignore-install esp4 $CMDLINE_OPTS", True),
        ("/sbin/modprobe -i esp4 && /bin/echo loaded", True),
        ("/sbin/modprobe esp4", False),  # would call itself again
        ("/sbin/insmod /lib/modules/x/kernel/net/ipv4/esp4.ko", True),
        ("/sbin/modprobe --ignore-install ah4", False),
    ],
)
def test_install_loads(command: str, loads: bool) -> None:
    assert km.install_loads(command, "esp4") is loads


def test_show_depends_parsing() -> None:
    text = (
        "install /bin/true \n"
        "insmod /lib/modules/5.4.0-216-generic/kernel/net/ipv4/esp4.ko \n"
        "builtin cbc\n"
    )
    assert km.parse_show_depends(text) == [
        ("install", "/bin/true"),
        ("insmod", "esp4"),
        ("builtin", "cbc"),
    ]


def test_kernel_version() -> None:
    assert km.kernel_version("5.4.0-216-generic") == (5, 4)
    assert km.kernel_version("4.15.0-1-kvm") < (5, 2)


def test_a_loaded_cpu_specific_implementation_is_enough() -> None:
    facts = facts_for(GENERIC, "blacklist aes_generic\n", loaded=False)
    facts.builtin.discard("aes_generic")
    facts.builtin_aliases = {k: v - {"aes_generic"} for k, v in facts.builtin_aliases.items()}
    facts.loaded.add("aesni_intel")

    verdict = km.judge_capability("aes", facts, recorded_probe(GENERIC / "show-depends.json"))

    assert verdict.ok and verdict.status == km.LOADED and verdict.module == "aesni_intel"


def test_alias_index_matches_wildcards_like_kmod() -> None:
    index = km.parse_modules_alias(
        "alias pci:v00008086d*sv*sd*bc*sc*i* e1000e\n"
        "alias crypto_sha256* sha256_ssse3\n"
        "alias net_pf_15 af_key\n"
        "alias * catch_all\n"
        "alias crypto-aes aesni_intel\n"
    )

    assert index.modules_for("crypto_aes") == ["catch_all", "aesni_intel"]  # file order
    assert index.modules_for("crypto_sha256_ni") == ["sha256_ssse3", "catch_all"]
    assert index.modules_for("net_pf_15") == ["af_key", "catch_all"]
    assert "e1000e" in index.modules_for("pci:v00008086d000010D3sv00008086sd0000A01Fbc02sc00i00")
