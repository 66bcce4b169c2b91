"""mkdocs hooks for the kubegate site (``hooks:`` in mkdocs.yml).

- Generates two reference pages at build time, so they cannot drift from the code:
  ``reference/configuration.md`` from the pydantic settings models (the top level, each connection type's
  ``upstream`` block, every built-in plugin's per-connection and gateway-wide settings, and the models
  nested in them) and ``reference/hooks.md`` from ``kubegate.core.hookspecs``.
- Rewrites relative links that leave ``docs/`` (they work on GitHub, where the whole repository is there):
  an image that exists (the UI screenshots the tests write to ``test-artifacts/``) is copied into the site;
  a missing image becomes a note; any other file becomes a link to the repository when ``repo_url`` is set
  (plain code text otherwise).

Nothing here is written to the source tree.
"""

from __future__ import annotations

import enum
import inspect
import posixpath
import re
import types
import typing
from pathlib import Path
from typing import Any

from mkdocs.config.defaults import MkDocsConfig
from mkdocs.structure.files import File, Files
from mkdocs.structure.pages import Page

CONFIG_PAGE = "reference/configuration.md"
HOOKS_PAGE = "reference/hooks.md"
EXTERNAL_DIR = "_external"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".svg", ".webp")


# ---------------------------------------------------------------------------------------------------------
# mkdocs events
# ---------------------------------------------------------------------------------------------------------


def on_files(files: Files, config: MkDocsConfig) -> Files:
    files.append(File.generated(config, CONFIG_PAGE, content=configuration_reference()))
    files.append(File.generated(config, HOOKS_PAGE, content=hook_reference()))
    # Images outside docs/ that pages link to (and that exist) are copied under _external/.
    docs_dir = Path(config.docs_dir).resolve()
    root = docs_dir.parent
    for file in list(files):
        if not file.is_documentation_page() or file.generated_by or not file.abs_src_path:
            continue
        text = Path(file.abs_src_path).read_text(encoding="utf-8")
        for target in _outside_targets(text, Path(file.abs_src_path).parent, docs_dir):
            if target.suffix.lower() in IMAGE_SUFFIXES and target.is_file():
                uri = f"{EXTERNAL_DIR}/{target.relative_to(root).as_posix()}"
                if files.get_file_from_path(uri) is None:
                    files.append(File.generated(config, uri, abs_src_path=str(target)))
    return files


def on_page_markdown(markdown: str, page: Page, config: MkDocsConfig, files: Files) -> str:
    if page.file.generated_by or not page.file.abs_src_path:
        return markdown
    docs_dir = Path(config.docs_dir).resolve()
    return rewrite_outside_links(
        markdown,
        page_dir=Path(page.file.abs_src_path).parent,
        page_uri=page.file.src_uri,
        docs_dir=docs_dir,
        repo_url=config.repo_url,
        edit_branch=_branch(config),
    )


def _branch(config: MkDocsConfig) -> str:
    # edit_uri is like "edit/main/docs/": take the branch from it, "main" otherwise.
    parts = (config.edit_uri or "").strip("/").split("/")
    return parts[1] if len(parts) > 1 and parts[0] in ("edit", "blob") else "main"


# ---------------------------------------------------------------------------------------------------------
# Links that leave docs/
# ---------------------------------------------------------------------------------------------------------

# ![alt](target "title") or [text](target "title"), not inside code.
_LINK = re.compile(r"(?P<bang>!?)\[(?P<text>[^\]]*)\]\((?P<target>[^)\s]+)(?P<title>\s+\"[^\"]*\")?\)")
_FENCE = re.compile(r"^(```|~~~)")
_CODE_SPAN = re.compile(r"`[^`]*`")


def _is_relative(target: str) -> bool:
    return not re.match(r"^([a-z][a-z0-9+.-]*:|/|#)", target, re.I)


def _resolve(target: str, page_dir: Path) -> Path:
    path = target.split("#", 1)[0].split("?", 1)[0]
    return (page_dir / path).resolve()


def _outside(path: Path, docs_dir: Path) -> bool:
    return not path.is_relative_to(docs_dir)


def _outside_targets(markdown: str, page_dir: Path, docs_dir: Path) -> list[Path]:
    found = []
    for line in _prose_lines(markdown):
        for match in _links_outside_code(line):
            target = match.group("target")
            if _is_relative(target) and _outside(_resolve(target, page_dir), docs_dir):
                found.append(_resolve(target, page_dir))
    return found


def _links_outside_code(line: str) -> list[re.Match[str]]:
    """The links of one line, except those inside code spans (a link's text may hold code)."""
    spans = [m.span() for m in _CODE_SPAN.finditer(line)]
    return [m for m in _LINK.finditer(line) if not any(a <= m.start() < b for a, b in spans)]


def _prose_lines(markdown: str) -> list[str]:
    lines, fenced = [], False
    for line in markdown.splitlines():
        if _FENCE.match(line.lstrip()):
            fenced = not fenced
            continue
        if not fenced:
            lines.append(line)
    return lines


def rewrite_outside_links(
    markdown: str, *, page_dir: Path, page_uri: str, docs_dir: Path, repo_url: str | None, edit_branch: str
) -> str:
    """Rewrite the links of one page that point outside `docs_dir` (see the module docstring)."""
    root = docs_dir.parent
    depth = posixpath.dirname(page_uri).count("/") + (1 if posixpath.dirname(page_uri) else 0)
    up = "../" * depth

    def replace(match: re.Match[str]) -> str:
        target = match.group("target")
        if not _is_relative(target):
            return match.group(0)
        path = _resolve(target, page_dir)
        if not _outside(path, docs_dir):
            return match.group(0)
        try:
            rel = path.relative_to(root).as_posix()
        except ValueError:
            rel = path.name
        anchor = "#" + target.split("#", 1)[1] if "#" in target else ""
        text, bang = match.group("text"), match.group("bang")
        if bang and path.suffix.lower() in IMAGE_SUFFIXES:
            if path.is_file():
                return f"![{text}]({up}{EXTERNAL_DIR}/{rel}{match.group('title') or ''})"
            return f"*({text}: `{rel}` is produced by the tests and was not there when this site was built)*"
        if repo_url:
            kind = "tree" if path.is_dir() else "blob"
            return f"[{text}]({repo_url.rstrip('/')}/{kind}/{edit_branch}/{rel}{anchor})"
        shown = f"`{rel}/`" if path.is_dir() else f"`{rel}`"
        return shown if text.strip("`").rstrip("/") in ("", rel) else f"{text} ({shown})"

    out, fenced = [], False
    for line in markdown.splitlines(keepends=True):
        if _FENCE.match(line.lstrip()):
            fenced = not fenced
            out.append(line)
            continue
        if fenced:
            out.append(line)
            continue
        pieces, last = [], 0
        for match in _links_outside_code(line):
            pieces += [line[last : match.start()], replace(match)]
            last = match.end()
        pieces.append(line[last:])
        out.append("".join(pieces))
    return "".join(out)


# ---------------------------------------------------------------------------------------------------------
# The configuration reference, from the settings models
# ---------------------------------------------------------------------------------------------------------


def _models_within(model: type, seen: list[type]) -> None:
    """`model`, then every model its fields hold (lists, dicts, optionals and unions), depth first."""
    from pydantic import BaseModel

    if model in seen:
        return
    seen.append(model)
    for field in model.model_fields.values():
        stack = [field.annotation]
        while stack:
            annotation = stack.pop(0)
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                _models_within(annotation, seen)
            stack.extend(typing.get_args(annotation))


def _anchor(model: type) -> str:
    return f"{model.__module__}.{model.__qualname__}".replace(".", "-").replace("_", "-").lower()


def _type_name(annotation: Any, linkable: set[type]) -> str:
    """A readable type: `list[str]`, `int`, `"a" | "b"`, `path | null`, model names as links."""
    from pydantic import BaseModel

    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is type(None):
        return "null"
    if origin is typing.Annotated:
        return _type_name(args[0], linkable)
    if origin is typing.Literal:
        return " | ".join(f'"{a}"' if isinstance(a, str) else repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a, linkable) for a in args)
    if origin is not None:
        name = getattr(origin, "__name__", str(origin))
        return f"{name}[{', '.join(_type_name(a, linkable) for a in args)}]"
    if isinstance(annotation, type):
        if issubclass(annotation, BaseModel):
            return annotation.__name__
        if issubclass(annotation, Path):
            return "path"
        if issubclass(annotation, enum.Enum):
            return " | ".join(f'"{m.value}"' for m in annotation)
        return {"typing.Any": "any"}.get(annotation.__name__, annotation.__name__)
    return "any" if annotation is typing.Any else str(annotation).replace("typing.", "")


def _value(value: Any) -> str:
    from pydantic import BaseModel

    if isinstance(value, BaseModel):
        return "(see its fields)"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, enum.Enum):
        value = value.value
    if isinstance(value, Path):
        value = str(value)
    text = repr(value) if not isinstance(value, str) else f'"{value}"'
    return text if len(text) <= 100 else text[:97] + "…"


def _default(field: Any) -> str:
    if field.is_required():
        return "required"
    if field.default_factory is not None:
        try:
            value = field.default_factory()
        except TypeError:  # factories that take the validated data
            return "computed"
        return _value(value)
    return _value(field.default)


def _constraints(field: Any) -> str:
    out = []
    symbols = {
        "gt": ">",
        "ge": "≥",
        "lt": "<",
        "le": "≤",
        "min_length": "min length",
        "max_length": "max length",
    }
    for item in field.metadata:
        for attr, symbol in symbols.items():
            if getattr(item, attr, None) is not None:
                out.append(f"{symbol} {getattr(item, attr)}")
    return ", ".join(out)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _model_section(model: type, key: str, linkable: set[type], level: int = 3) -> str:
    doc = inspect.getdoc(model) or ""
    if doc.startswith(("A base class", "Usage docs:")) or "pydantic" in doc.lower():
        doc = ""
    lines = [f"{'#' * level} {model.__name__} {{ #{_anchor(model)} }}", ""]
    if key:
        lines += [f"Configured at `{key}`.", ""]
    if doc:
        lines += [doc, ""]
    lines += ["| key | type | default | description |", "|---|---|---|---|"]
    for name, field in model.model_fields.items():
        key_name = field.alias or name
        type_text = _type_name(field.annotation, linkable)
        nested = [m for m in linkable if m.__name__ in re.findall(r"\w+", type_text)]
        for m in nested:
            type_text = re.sub(rf"\b{m.__name__}\b", f"[{m.__name__}](#{_anchor(m)})", type_text)
        description = field.description or ""
        constraint = _constraints(field)
        if constraint:
            description = f"{description} ({constraint})" if description else f"({constraint})"
        lines.append(
            f"| `{key_name}` | {_cell(type_text)} | `{_cell(_default(field))}` | {_cell(description) or '—'} |"
        )
    return "\n".join(lines) + "\n"


def _roots() -> list[tuple[str, str, str, type]]:
    """(group, title, config key, model) for every settings model the gateway validates."""
    from kubegate.core.config import GatewaySettings
    from kubegate.core.plugins import PluginHost

    host = PluginHost(load_entry_points=False)  # the built-ins, not whatever is installed where docs build
    roots: list[tuple[str, str, str, type]] = [
        ("Top level", "The config file", "(top level)", GatewaySettings)
    ]
    for name, ctype in sorted(host.connection_types().items()):
        roots.append(
            (
                "Connection types",
                f"`{name}`",
                f"connections.NAME.upstream (type: {name})",
                ctype.settings_model,
            )
        )
    for name, model in sorted(host.plugin_settings_models().items()):
        roots.append(
            ("Per-connection plugin settings", f"`{name}`", f"connections.NAME.plugins.{name}", model)
        )
    for name, model in sorted(host.gateway_settings_models().items()):
        roots.append(("Gateway-wide plugin settings", f"`{name}`", f"plugins.{name}", model))
    return roots


def configuration_reference() -> str:
    roots = _roots()
    every: list[type] = []
    for *_, model in roots:
        _models_within(model, every)
    linkable = set(every)
    out = [
        "# Configuration reference",
        "",
        "Generated from the pydantic settings models when this site is built, so it always matches the code."
        " [configuration.md](../configuration.md) explains the keys with examples; this page lists every"
        " key of every model with its type and default. A key marked *required* must be given when its"
        " block is present.",
        "",
    ]
    written: set[type] = set()
    group = ""
    for section, title, key, model in roots:
        if section != group:
            out += [f"## {section}", ""]
            group = section
        nested: list[type] = []
        _models_within(model, nested)
        if model in written:
            out += [f"### {title}", "", f"Configured at `{key}`: [{model.__name__}](#{_anchor(model)}).", ""]
            continue
        out.append(
            _model_section(model, key, linkable).replace(
                f"### {model.__name__} ", f"### {title}: {model.__name__} ", 1
            )
        )
        written.add(model)
        for inner in nested[1:]:
            if inner not in written:
                out.append(_model_section(inner, "", linkable, level=4))
                written.add(inner)
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------------------
# The hook reference, from the hook specs
# ---------------------------------------------------------------------------------------------------------

_ROLE = re.compile(r":(?:class|meth|func|attr|mod|obj|data|exc):`(~?)([^`]+)`")
_FIELD = re.compile(r"^:(param|return|returns|raises)\s*([\w.]*)\s*:\s*(.*)$")


def rst_to_markdown(doc: str) -> str:
    """The hook docstrings' reStructuredText subset as Markdown: roles, literals and field lists."""
    # :class:`~a.b.C` shows `C`; without the tilde the whole target shows (rST's rule).
    text = _ROLE.sub(lambda m: f"``{m.group(2).rsplit('.', 1)[-1] if m.group(1) else m.group(2)}``", doc)
    text = text.replace("``", "`")
    out: list[str] = []
    in_fields = False
    for line in text.splitlines():
        field = _FIELD.match(line)
        if field:
            kind, name, rest = field.groups()
            if not in_fields and out and out[-1]:
                out.append("")
            in_fields = True
            label = f"`{name}`" if kind == "param" else ("returns" if kind.startswith("return") else "raises")
            out.append(f"- **{label}**: {rest}")
        elif in_fields and line.strip() and line[:1].isspace():
            out[-1] += " " + line.strip()  # a field's continuation line
        else:
            in_fields = in_fields and bool(line.strip())
            out.append(line)
    return "\n".join(out)


def _scope(name: str, params: list[str]) -> str:
    if name in ("kubegate_record_body", "kubegate_record_query"):
        return "gateway hook: called on every installed plugin"
    if "flow" not in params and "connection" not in params:
        return "gateway hook: called on every installed plugin"
    return "connection hook: called on the plugins enabled on the connection"


def _annotation_text(annotation: Any) -> str:
    # The specs use `from __future__ import annotations`: annotations are already source text.
    return annotation if isinstance(annotation, str) else inspect.formatannotation(annotation)


def _signature_text(signature: inspect.Signature) -> str:
    params = ", ".join(
        name if p.annotation is inspect.Parameter.empty else f"{name}: {_annotation_text(p.annotation)}"
        for name, p in signature.parameters.items()
    )
    ret = signature.return_annotation
    return f"({params})" + ("" if ret is inspect.Signature.empty else f" -> {_annotation_text(ret)}")


def hook_reference() -> str:
    from kubegate.core import hookspecs

    intro = rst_to_markdown(inspect.getdoc(hookspecs) or "")
    out = [
        "# Hook reference",
        "",
        "Generated from `kubegate.core.hookspecs` when this site is built: every hook, in the order a request"
        " meets them, with its signature and docstring. The rules of the host and a worked example are in"
        " [Writing plugins](../plugins.md).",
        "",
        intro,
        "",
    ]
    for name in hookspecs.all_hook_names():
        fn = getattr(hookspecs, name)
        signature = inspect.signature(fn)
        params = list(signature.parameters)
        out += [
            f"## `{name}({', '.join(params)})` {{ #{name} }}",
            "",
            f"*{_scope(name, params)}*",
            "",
            "```python",
            "@hookimpl",
            f"def {name}{_signature_text(signature)}: ...",
            "```",
            "",
            rst_to_markdown(inspect.getdoc(fn) or ""),
            "",
        ]
    return "\n".join(out)
