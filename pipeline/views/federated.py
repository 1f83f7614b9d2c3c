"""The report's section on `sift federate`: NLL per round on the held-out set and on each client's
validation split, and a table of rounds with the clients that trained and those that failed.

    sift report --run demo            # the section appears once runs/demo/federate.json exists

Reads federate.json only: the stage writes its figures, views only show them.
"""

from __future__ import annotations

import html
from pathlib import Path

from pipeline.io.artifacts import read_json
from pipeline.views import plots


def curves(series: dict[str, list[tuple[int, float]]]) -> str:
    """NLL per answer token against the round, one line per series, as a PNG data URI."""
    plt = plots._pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for i, (name, points) in enumerate(series.items()):
        if points:
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, marker="o", color=plots.COLORS[i % len(plots.COLORS)], label=name,
                    linewidth=2.4 if i == 0 else 1.2)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round (0: before training)")
    ax.set_ylabel("NLL / answer token")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return plots.to_data_uri(fig)


def federate_section(d: Path) -> str:
    path = d / "federate.json"
    if not path.is_file():
        return "<p class=missing>No federate.json (run `sift federate` / `make federate` for federated LoRA).</p>"
    state = read_json(path)
    entries = [{"round": 0, **(state.get("initial") or {}), "trained": {}, "failed": []}, *state.get("rounds", [])]
    series: dict[str, list[tuple[int, float]]] = {f"held-out ({state['settings'].get('heldout_kind')})": [
        (e["round"], e["heldout_nll"]) for e in entries if isinstance(e.get("heldout_nll"), int | float)]}
    for c in state.get("clients", []):
        k = f"client-{state['clients'].index(c)}"
        series[f"{c['name']} valid"] = [(e["round"], e["clients_valid"][k]["valid_nll"]) for e in entries
                                        if e.get("clients_valid", {}).get(k, {}).get("valid_nll") is not None]
    rows = "".join(
        f"<tr><td class=num>{e['round']}</td><td class=num>{e.get('heldout_nll', float('nan')):.4f}</td>"
        f"<td>{html.escape(', '.join(e['trained']) or '-')}</td>"
        f"<td>{html.escape('; '.join(f['error'] for f in e['failed']) or 'none')}</td>"
        f"<td class=num>{e.get('seconds', '')}</td></tr>" for e in entries)
    s = state["settings"]
    return (f"<p>{len(state.get('clients', []))} clients, aggregation <b>{html.escape(str(s.get('aggregation')))}</b>, "
            f"{s['local']['local_steps']} local steps per round; held-out set: "
            f"{html.escape(str(s.get('heldout')))}.</p>"
            f'<img src="{curves(series)}" alt="federated NLL per round">'
            "<table><tr><th>round</th><th>held-out NLL</th><th>trained</th><th>failed</th><th>seconds</th></tr>"
            f"{rows}</table>")
