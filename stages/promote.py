"""DVC stage `promote`: gate the new version against the champion; move `champion` if it passes."""

from __future__ import annotations

from upbeat.startup import imports_kept

with imports_kept():  # the libraries load with the GC off (upbeat/startup.py)
    import argparse

    from upbeat.config import load_params
    from upbeat.errors import exit_on_user_error
    from upbeat.registry import champion_version, promote_if_passes
    from upbeat.tracking import log_metrics, read_json, stage_run, write_json


@exit_on_user_error
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--register", required=True, help="register's JSON (model name, version)")
    parser.add_argument("--out", required=True, help="JSON with the gate's decision")
    args = parser.parse_args()

    params = load_params()
    reg = read_json(args.register)
    with stage_run("promote", params.gate.model_dump()):
        decision = promote_if_passes(reg["model_name"], str(reg["version"]), params.gate)
        champion = champion_version(reg["model_name"])
        log_metrics({"gate/passed": float(decision.passed)})
        write_json(
            args.out,
            {
                "model_name": reg["model_name"],
                "version": str(reg["version"]),
                "passed": decision.passed,
                "reasons": decision.reasons,
                "champion": str(champion.version) if champion else None,
            },
        )
    verdict = "promoted to champion" if decision.passed else "stays challenger"
    print(f"promote: version {reg['version']} {verdict}")
    for reason in decision.reasons:
        print(f"  {reason}")


if __name__ == "__main__":
    main()
