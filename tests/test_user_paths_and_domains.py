"""Every path a user names is checked before it is opened (a FIFO never blocks), and every parameter
outside its domain is refused with one line: CLI exit 1, no traceback, nothing written."""

from __future__ import annotations

import os

import pytest
from click.testing import CliRunner
from conftest import FIXTURES, snapshot

from streammerge import sidecar
from streammerge.cli import main
from streammerge.errors import StreamMergeError

BASE, A = FIXTURES / "tiny-llama-fp32-base", FIXTURES / "tiny-llama-fp32-a"
ADAPTERS = FIXTURES / "adapters"


pytestmark = pytest.mark.usefixtures("no_hang")


def cli(*args) -> tuple[int, str]:
    r = CliRunner().invoke(main, [str(a) for a in args])
    return r.exit_code, r.output  # click >= 8.2: stdout and stderr together


def _assert_one_line(code: int, text: str, needle: str) -> None:
    assert code == 1, text
    assert needle in text and "Traceback" not in text, text
    assert len([line for line in text.splitlines() if line.startswith("error:")]) == 1, text


def test_config_that_is_a_fifo_is_refused(tmp_path):
    os.mkfifo(tmp_path / "cfg.yaml")
    code, text = cli("merge", tmp_path / "cfg.yaml", tmp_path / "out")
    _assert_one_line(code, text, "cfg.yaml: is a FIFO, not config")
    assert not (tmp_path / "out").exists()


def _ota_config(tmp_path, second_moment) -> str:
    text = (f"merge_method: ota\nbase_model: {BASE}\nmodels:\n  - model: {A}\n    sidecar: {second_moment}\n"
            f"  - model: {FIXTURES / 'tiny-llama-fp32-b'}\n    sidecar: {second_moment}\n")
    (tmp_path / "ota.yaml").write_text(text)
    return str(tmp_path / "ota.yaml")


@pytest.mark.parametrize("name", ["v.sidecar", "v.safetensors"])
def test_sidecar_that_is_a_fifo_is_refused(tmp_path, name):
    os.mkfifo(tmp_path / name)
    before = snapshot(FIXTURES)
    code, text = cli("merge", _ota_config(tmp_path, tmp_path / name), tmp_path / "out")
    _assert_one_line(code, text, f"{name}: is a FIFO, not a second-moment file")
    assert not (tmp_path / "out").exists() and snapshot(FIXTURES) == before


@pytest.mark.parametrize("name", ["optimizer.pt", "exp_avg_sq.safetensors"])
def test_sidecar_convert_source_that_is_a_fifo_is_refused(tmp_path, name):
    os.mkfifo(tmp_path / name)
    code, text = cli("sidecar", "convert", tmp_path / name, tmp_path / "out.sidecar")
    _assert_one_line(code, text, "is a FIFO")
    assert not (tmp_path / "out.sidecar").exists()


def test_sidecar_load_of_a_fifo_raises_at_once(tmp_path):
    os.mkfifo(tmp_path / "v.sidecar")
    with pytest.raises(StreamMergeError, match="is a FIFO"):
        sidecar.load(tmp_path / "v.sidecar")


@pytest.mark.parametrize("member", ["adapter_config.json", "adapter_model.safetensors"])
def test_adapter_member_that_is_a_fifo_is_refused(tmp_path, member):
    adapter = tmp_path / "lora"
    adapter.mkdir()
    for f in (ADAPTERS / "lora-a").iterdir():
        if f.name == member:
            os.mkfifo(adapter / f.name)
        else:
            (adapter / f.name).write_bytes(f.read_bytes())
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"merge_method: task_arithmetic\nbase_model: {BASE}\nmodels:\n"
                   f"  - model: {adapter}\n    parameters: {{weight: 1.0}}\n")
    code, text = cli("merge", cfg, tmp_path / "out")
    _assert_one_line(code, text, f"{member}: is a FIFO, not ")
    assert not (tmp_path / "out").exists()


def test_model_config_json_that_is_a_fifo_is_refused(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    for f in A.iterdir():
        if f.name == "config.json":
            os.mkfifo(model / f.name)
        else:
            (model / f.name).write_bytes(f.read_bytes())
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"merge_method: linear\nmodels:\n  - model: {model}\n    parameters: {{weight: 1.0}}\n"
                   f"  - model: {A}\n    parameters: {{weight: 1.0}}\n")
    code, text = cli("merge", cfg, tmp_path / "out")
    _assert_one_line(code, text, "is a FIFO")


DOMAIN = [
    ("ties", "{weight: 1.0, density: 1.7}", "density must be in (0, 1], got 1.7"),
    ("dare_ties", "{weight: 1.0, density: 1.7}", "density must be in (0, 1], got 1.7"),
    ("dare_linear", "{weight: 1.0, density: 0}", "density must be in (0, 1], got 0"),
    ("ties", "{weight: 1.0, density: -0.2}", "density must be in (0, 1], got -0.2"),
    ("task_arithmetic", "{weight: .inf}", "weight must be a finite number, got inf"),
    ("linear", "{weight: .nan}", "weight must be a finite number, got nan"),
    # a filtered value for some tensors only: found while planning, naming the tensor
    ("ties", "{weight: 1.0, density: [{filter: mlp, value: 1.5}, {value: 0.5}]}",
     "density must be in (0, 1], got 1.5 (tensor model.layers.0.mlp."),
]


@pytest.mark.parametrize("method,params,needle", DOMAIN, ids=[f"{m}:{p}" for m, p, _ in DOMAIN])
def test_parameter_outside_its_domain_is_refused(tmp_path, method, params, needle):
    base_line = "" if method == "linear" else f"base_model: {BASE}\n"
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"merge_method: {method}\n{base_line}models:\n  - model: {A}\n    parameters: {params}\n"
                   f"  - model: {FIXTURES / 'tiny-llama-fp32-b'}\n    parameters: {{weight: 1.0}}\n")
    code, text = cli("merge", cfg, tmp_path / "out")
    _assert_one_line(code, text, needle)
    assert not (tmp_path / "out").exists()
