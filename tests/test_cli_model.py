"""``dsdeploy inspect`` / ``convert`` through the real command line."""

import torch

from tests.clirun import dsdeploy, dsdeploy_chain, json_out

FACTORY = "tests.conftest:small_net"


def test_help_lists_commands():
    proc = dsdeploy("--help")
    assert proc.returncode == 0
    for cmd in ("inspect", "convert"):
        assert cmd in proc.stdout


def test_inspect_json_reports_every_conv():
    out = json_out(dsdeploy("inspect", FACTORY, "--input-shape", "1,3,16,16", "--json"))
    reasons = {l["name"]: l["reason"] for l in out["layers"]}
    assert reasons["conv1"] == "converted" and reasons["dw"] == "already depthwise"
    assert out["summary"]["convs"] == 7 and out["summary"]["converted"] == 3


def test_convert_writes_artifact_and_reports_ranks(tmp_path):
    dest = tmp_path / "m.dsd"
    out = json_out(dsdeploy("convert", FACTORY, "-o", dest, "--input-shape", "1,3,16,16", "--mac-budget", "0.4",
                            "--json"))
    assert dest.is_file()
    conv = [l for l in out["layers"] if l["convert"]]
    assert conv and all(l["rank"] >= 1 for l in conv)
    assert out["summary"]["conv_mac_ratio"] < 1
    # the artifact is a model spec for every command; its recorded factory is imported only when trusted
    refused, trusted = dsdeploy_chain(("inspect", dest, "--json"), ("inspect", dest, "--trust-code", "--json"),
                                      keep_going=True)  # one fresh process: the refusal comes before any import
    assert refused.returncode == 2 and "--trust-code" in refused.stderr and len(refused.stderr.splitlines()) == 1
    again = json_out(trusted)
    assert again["input_shape"] == [1, 3, 16, 16]
    payload = torch.load(dest, weights_only=True)
    assert payload["history"][0]["stage"] == "convert"


def test_nothing_to_convert_has_its_own_exit_status(tmp_path):
    proc = dsdeploy("convert", FACTORY, "-o", tmp_path / "x.dsd", "--input-shape", "1,3,16,16",
                    "--include", "^nothing$")
    assert proc.returncode == 3
    assert proc.stderr.startswith("error: nothing to convert") and "Traceback" not in proc.stderr
    assert not (tmp_path / "x.dsd").exists()


def test_user_errors_are_one_line(tmp_path):
    unknown, shape, debug = dsdeploy_chain(  # one real process, each command's own exit status and stderr
        ("inspect", "torchvision:resnet19"), ("inspect", FACTORY, "--input-shape", "1,5,16,16"),
        ("--debug", "inspect", "torchvision:resnet19"), keep_going=True)
    assert unknown.returncode == 2
    assert unknown.stderr.strip().count("\n") == 0 and "did you mean" in unknown.stderr
    assert shape.returncode == 2 and "cannot run on input shape" in shape.stderr
    assert shape.stderr.strip().count("\n") == 0 and "Traceback" not in shape.stderr
    assert debug.returncode != 0 and "Traceback" in debug.stderr
