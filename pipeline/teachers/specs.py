"""Which teachers a run uses: `--teacher.pool teachers.yaml`, or `--teacher.pool a,b=2` on the command line.

    specs = parse_teachers("teachers.yaml", backend="transformers")
    specs = parse_teachers("smollm2-135m-instruct=2,gemma-3-270m", backend="transformers")

A teachers file (YAML or TOML) lists each teacher under `teachers:` (or as a top-level list):

    teachers:
      - name: smol                       # how records, figures and the cache name it
        model: smollm2-135m-instruct     # alias, local folder, .gguf file or served model name
        backend: transformers            # transformers | vllm | openai
        share: 2                         # relative share of the requests (default 1)
        options: {engine: fast}          # the backend's own settings (as --teacher.options)
      - name: gemma
        model: gemma-3-270m
        share: 1

An entry without `backend` takes the teacher section's backend; an entry on the stage's backend also takes
its base_url and api_key_env where it names none, and its options under its
own `options` (the entry's own values win). On the command line, models are comma-separated, each
optionally `=share`, and all use the teacher section's backend, base_url and options. A mistake
is one SiftError naming file, line and field.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import SiftError
from pipeline.settings import API_KEY_ENV

FILE_SUFFIXES = (".yaml", ".yml", ".toml")
KEYS = ("name", "model", "backend", "share", "base_url", "api_key_env", "options")
POOL_FIELD = "teacher.pool"  # the setting a pool given on the command line comes from
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")  # also a cache file name


@dataclass(frozen=True)
class TeacherSpec:
    """One teacher of a pool."""

    name: str  # unique in the pool; provenance, figures and cache/teachers/<name>.jsonl use it
    model: str  # what the backend loads or asks for
    backend: str = "transformers"  # transformers | vllm | openai
    share: float = 1.0  # relative share of the requests; 0 sends it none
    base_url: str | None = None  # for the openai backend
    api_key_env: str = API_KEY_ENV  # environment variable with the key (never logged)
    options: dict[str, Any] = field(default_factory=dict)  # the backend's own options, already converted

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def default_name(model: str) -> str:
    """A teacher's name from its model: the file or folder name, without .gguf, made safe."""
    base = Path(model.rstrip("/")).name or model
    base = base.removesuffix(".gguf")
    safe = re.sub(r"[^A-Za-z0-9._-]+", "-", base).strip("-.") or "teacher"
    return safe[:64]


def parse_teachers(text: str, *, backend: str = "transformers", base_url: str | None = None,
                   api_key_env: str = API_KEY_ENV, teacher_options: str | None = None) -> list[TeacherSpec]:
    """A teachers file, or comma-separated models each optionally `=share` (using the stage's backend)."""
    text = text.strip()
    if not text:
        raise SiftError("empty: give a teachers file or comma-separated models", field=POOL_FIELD)
    from pipeline.teachers.options import parse_teacher_options

    if text.endswith(FILE_SUFFIXES) or (Path(text).is_file() and "," not in text):
        stage = StageTeacher(backend=backend, base_url=base_url, api_key_env=api_key_env,
                             options=parse_teacher_options(teacher_options, backend))
        return read_teachers_file(Path(text), stage=stage)
    options = parse_teacher_options(teacher_options, backend)
    specs = []
    for item in (p.strip() for p in text.split(",")):
        if not item:
            continue
        model, eq, share_text = item.rpartition("=") if "=" in item else (item, "", "")
        share = _share(share_text, field=POOL_FIELD) if eq else 1.0
        specs.append(TeacherSpec(name=default_name(model), model=model.strip(), backend=backend, share=share,
                                 base_url=base_url, api_key_env=api_key_env, options=options))
    return _checked(specs, path=None, lines=None)


@dataclass(frozen=True)
class StageTeacher:
    """The stage's own teacher settings, which a teachers-file entry inherits (see the module docstring)."""

    backend: str = "transformers"
    base_url: str | None = None
    api_key_env: str = API_KEY_ENV
    options: dict[str, Any] = field(default_factory=dict)  # teacher.options, converted for `backend`


def read_teachers_file(path: Path, *, stage: StageTeacher | None = None) -> list[TeacherSpec]:
    """Teacher specs from a YAML or TOML file (see the module docstring for the shape); `stage`:
    the settings an entry inherits (default: the transformers backend and nothing else)."""
    stage = stage or StageTeacher()
    from pipeline.io.files import MAX_SETTINGS_BYTES, read_bounded  # one reader for every file's errors

    data = read_bounded(path, MAX_SETTINGS_BYTES)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise SiftError("invalid UTF-8", path=path) from None
    items, lines = _load_items(text, path)
    from pipeline.teachers.options import BACKENDS, check_teacher_options

    specs = []
    for i, (item, line) in enumerate(zip(items, lines, strict=True)):
        where = f"teachers[{i}]"
        if not isinstance(item, dict):
            raise SiftError("expected a mapping with at least `model`", path=path, line=line, field=where)
        unknown = sorted(str(k) for k in item if k not in KEYS)
        if unknown:
            raise SiftError(f"unknown key {unknown[0]!r}; a teacher takes {', '.join(KEYS)}", path=path, line=line,
                            field=f"{where}.{unknown[0]}")
        model = item.get("model")
        if not isinstance(model, str) or not model.strip():
            raise SiftError("missing or not a string", path=path, line=line, field=f"{where}.model")
        backend = item.get("backend", stage.backend)
        if backend not in BACKENDS:
            raise SiftError(f"unknown backend {backend!r} (choose one of {', '.join(BACKENDS)})", path=path,
                            line=line, field=f"{where}.backend")
        for key in ("name", "base_url", "api_key_env"):
            if key in item and not isinstance(item[key], str):
                raise SiftError("not a string", path=path, line=line, field=f"{where}.{key}")
        inherits = backend == stage.backend  # the stage's server, key and options fit its own backend only
        base_url = item.get("base_url") or (stage.base_url if inherits else None)
        if backend == "openai" and not base_url:
            raise SiftError("the openai backend needs base_url (e.g. http://localhost:8000/v1), here or as the "
                            "stage's --base-url", path=path, line=line, field=f"{where}.base_url")
        raw_options = item.get("options") or {}
        if isinstance(raw_options, str):
            from pipeline.teachers.options import parse_teacher_options

            try:
                options = parse_teacher_options(raw_options, backend)
            except SiftError as e:
                raise SiftError(e.reason, path=path, line=line, field=f"{where}.options") from None
        elif isinstance(raw_options, dict):
            options = check_teacher_options(raw_options, backend, field=f"{where}.options", path=path, line=line)
        else:
            raise SiftError("expected a mapping (or key=value text)", path=path, line=line, field=f"{where}.options")
        if inherits:
            options = {**stage.options, **options}
        specs.append(TeacherSpec(
            name=item.get("name") or default_name(model), model=model.strip(), backend=backend,
            share=_share(item.get("share", 1.0), field=f"{where}.share", path=path, line=line), base_url=base_url,
            api_key_env=item.get("api_key_env") or (stage.api_key_env if inherits else API_KEY_ENV),
            options=options))
    return _checked(specs, path=path, lines=lines)


def _load_items(text: str, path: Path) -> tuple[list[Any], list[int | None]]:
    """The list of teacher entries and the line each starts on (YAML; TOML has no line marks)."""
    if path.suffix == ".toml":
        import tomllib

        try:
            loaded: Any = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise SiftError(f"invalid TOML: {e}", path=path) from None
        items = loaded.get("teachers") if isinstance(loaded, dict) else None
        if not isinstance(items, list):
            raise SiftError("expected [[teachers]] tables", path=path, field="teachers")
        return items, [None] * len(items)
    import yaml

    try:
        node = yaml.compose(text)
        loaded = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise SiftError(f"invalid YAML: {getattr(e, 'problem', None) or e}", path=path,
                        line=mark.line + 1 if mark is not None else None) from None
    seq = node
    if isinstance(node, yaml.MappingNode):
        seq = next((v for k, v in node.value if getattr(k, "value", None) == "teachers"), None)
        loaded = loaded.get("teachers")
    if not isinstance(seq, yaml.SequenceNode) or not isinstance(loaded, list):
        raise SiftError("expected a list of teachers (or a `teachers:` list)", path=path, field="teachers")
    return loaded, [n.start_mark.line + 1 for n in seq.value]


def _share(value: Any, *, field: str, path: Path | None = None, line: int | None = None) -> float:
    try:
        if isinstance(value, bool):
            raise ValueError
        share = float(value)
    except (TypeError, ValueError):
        raise SiftError(f"share: expected a number, got {value!r}", path=path, line=line, field=field) from None
    if not share >= 0 or share == float("inf"):
        raise SiftError(f"share must be a finite number >= 0, got {value!r}", path=path, line=line, field=field)
    return share


def _checked(specs: list[TeacherSpec], *, path: Path | None, lines: list[int | None] | None) -> list[TeacherSpec]:
    if not specs:
        raise SiftError("no teachers listed", path=path, field="teachers" if path else POOL_FIELD)
    seen: dict[str, int] = {}
    for i, spec in enumerate(specs):
        line = lines[i] if lines else None
        where = f"teachers[{i}]"
        if not NAME.match(spec.name):
            raise SiftError(f"name {spec.name!r}: use letters, digits, '.', '_' or '-' (at most 64)",
                            path=path, line=line, field=f"{where}.name")
        if spec.name in seen:
            raise SiftError(f"two teachers are named {spec.name!r}; give each its own name", path=path, line=line,
                            field=f"{where}.name")
        seen[spec.name] = i
    if not any(s.share > 0 for s in specs):
        raise SiftError("every share is 0; at least one teacher needs a share above 0", path=path,
                        field="teachers" if path else POOL_FIELD)
    return specs
