"""The game-engine bindings in ``bindings/``.

C#: the sources are compiled with Mono's ``mcs`` and the test program (``bindings/csharp/Tests``) runs with
``mono`` against real ``gllm serve`` processes that it starts and restarts itself. The greedy tokens and
logprobs it must see come from the engine run directly here, so the whole chain (C# msgpack and ZMTP,
runtime, engine) is checked against the engine alone. Without ``mcs``/``mono`` the test is skipped; CI
installs them (Debian ``mono-mcs`` and ``mono-runtime``).

GDScript: no Godot binary is available to CI, so every ``.gd`` file is parsed and linted with gdtoolkit.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TINY_CONFIGS
from lora_fixtures import make_adapter
from tiny_chat import build_chat_model

ROOT = Path(__file__).resolve().parents[1]
BINDINGS = ROOT / "bindings"
PROMPT_TOKENS = [1, 17, 42, 99, 7]
NUM_TOKENS = 8
MONO_TIMEOUT_S = 900  # two runtime starts on a busy 2-core machine, plus a few short streams


def free_ports(n: int) -> list[int]:
    """n distinct ports that were free a moment ago (held open together, so the OS cannot repeat one)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def passed_cleanly(output: str) -> bool:
    """The test program's last line is "N passed, 0 failed" and no step failed."""
    return "FAIL" not in output and re.search(r"^\d+ passed, 0 failed$", output.rstrip(), re.MULTILINE) is not None


def engine_greedy(model_dir: Path, adapter: Path | None = None) -> tuple[list[int], list[float]]:
    """The engine's own greedy tokens and logprobs for PROMPT_TOKENS (under a LoRA ``adapter`` when given):
    what the C# stream must reproduce."""
    from gllm.engine import GenerationRequest, GeneratorParams, LLMEngine

    adapters = {"npc": adapter} if adapter else None
    engine = LLMEngine(str(model_dir), GeneratorParams(max_batch_size=1, max_seq_len=512), adapters=adapters)
    (result,) = engine.generate([GenerationRequest(prompt_token_ids=PROMPT_TOKENS, max_new_tokens=NUM_TOKENS,
                                                   temperature=0.0, ignore_eos=True, adapter=adapters and "npc")])
    assert len(result.token_ids) == NUM_TOKENS
    return result.token_ids, result.logprobs


def build_csharp(out: Path) -> None:
    subprocess.run(["bash", str(BINDINGS / "csharp" / "build.sh"), str(out)], check=True, capture_output=True,
                   text=True, timeout=300)


@pytest.fixture(scope="module")
def csharp_build(tmp_path_factory) -> Path:
    missing = [tool for tool in ("mcs", "mono") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"{' and '.join(missing)} not installed (CI installs the Debian packages mono-mcs and mono-runtime)")
    out = tmp_path_factory.mktemp("csharp")
    try:
        build_csharp(out)
    except subprocess.CalledProcessError as exc:
        pytest.fail(f"mcs failed:\n{exc.stdout}\n{exc.stderr}")
    return out


def run_mono(args: list[str]) -> subprocess.CompletedProcess:
    """Runs the test program in its own process group, so the runtimes it starts die with it whatever happens."""
    proc = subprocess.Popen(["mono", "--debug", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=MONO_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"the C# test program did not finish within {MONO_TIMEOUT_S} s:\n{out}")
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # a runtime left behind by a crash
        except ProcessLookupError:
            pass
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, "")


def test_csharp_codec_offline(csharp_build: Path):
    """msgpack against every test vector, and ZMTP framing, without a runtime."""
    result = run_mono([str(csharp_build / "BindingsTest.exe"), "--vectors", str(BINDINGS / "testvectors")])
    assert result.returncode == 0 and passed_cleanly(result.stdout), result.stdout


def test_csharp_client_against_runtime(csharp_build: Path, tmp_path: Path):
    model_dir = build_chat_model(tmp_path / "tiny", **TINY_CONFIGS["gqa_tied_llama3"])  # a tokenizer: structured output
    tokens, logprobs = engine_greedy(model_dir)
    import transformers

    make_adapter(transformers.AutoModelForCausalLM.from_pretrained(model_dir), tmp_path / "npc", seed=1)
    adapter_tokens, _ = engine_greedy(model_dir, tmp_path / "npc")
    assert adapter_tokens != tokens
    port, dead_port = free_ports(2)
    result = run_mono([
        str(csharp_build / "BindingsTest.exe"),
        "--vectors", str(BINDINGS / "testvectors"),
        "--python", sys.executable,
        "--model", str(model_dir),
        "--port", str(port),
        "--dead-port", str(dead_port),
        "--prompt-tokens", ",".join(map(str, PROMPT_TOKENS)),
        "--expect-tokens", ",".join(map(str, tokens)),
        "--expect-logprobs", ",".join(repr(lp) for lp in logprobs),
        "--adapter", str(tmp_path / "npc"),
        "--expect-adapter-tokens", ",".join(map(str, adapter_tokens)),
    ])
    assert result.returncode == 0 and passed_cleanly(result.stdout), result.stdout


GD_FILES = sorted((BINDINGS / "gdscript").rglob("*.gd"))


def gdtoolkit_command(tool: str) -> list[str]:
    try:
        import gdtoolkit  # noqa: F401
    except ImportError:
        pytest.fail('gdtoolkit is missing: pip install "gdtoolkit>=4,<5" (part of the dev extra)')
    return [sys.executable, "-m", f"gdtoolkit.{tool}"]


def test_gdscript_files_exist():
    names = {p.name for p in GD_FILES}
    assert {"llm_client.gd", "llm_request.gd", "msgpack.gd", "transport.gd", "zmtp.gd"} <= names, names
    assert (BINDINGS / "gdscript" / "addons" / "gllm" / "plugin.cfg").is_file()


@pytest.mark.parametrize("path", GD_FILES, ids=lambda p: str(p.relative_to(BINDINGS / "gdscript")))
def test_gdscript_parses_and_lints(path: Path):
    parsed = subprocess.run([*gdtoolkit_command("parser"), str(path)], capture_output=True, text=True, timeout=120)
    assert parsed.returncode == 0, parsed.stdout + parsed.stderr
    linted = subprocess.run([*gdtoolkit_command("linter"), str(path)], capture_output=True, text=True, timeout=120)
    assert linted.returncode == 0, linted.stdout + linted.stderr
