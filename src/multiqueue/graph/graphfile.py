"""Graph files: a flow graph written as YAML, loaded into a GraphSpec (``mq run``).

``load_graph(path, domain=None)`` / ``load_graph_text(text)`` return a ``GraphSpec``
(run it with ``Runtime.from_spec``); every problem of the file is a GraphFileError,
``<file>:<line>: <key path>: <what is wrong>``.  The format and its errors:
docs/graphs.md, "Graph files"; ``hosts:`` and remote edges: docs/network.md.
"""

import difflib
import importlib
import inspect
import re
import sys
from pathlib import Path

import yaml

from ..checks import MAX_CAPACITY
from ..errors import GraphError, GraphFileError
from ..shm import PoolConfig, ShmConfig
from ..shm.segment import check_domain
from ..stream.queue import POLICIES
from . import blocks as builtin_blocks
from .block import Block
from .spec import GraphSpec, HostSpec, default_remote_key

TOP_KEYS = ("domain", "capacity", "pools", "hosts", "remote_control", "blocks", "connections")
BLOCK_KEYS = ("class", "params", "placement", "restart", "max_restarts", "host")
EDGE_KEYS = ("from", "to", "policy", "capacity", "remote", "key")
HOST_KEYS = ("domain", "zenoh")
POOL_KEYS = {"name": "name", "block_size": "block_size", "count": "block_count",
             "expandable": "expandable", "max_blocks": "max_blocks"}  # file key -> PoolConfig field
BUILTINS = {name: obj for name, obj in vars(builtin_blocks).items()
            if isinstance(obj, type) and issubclass(obj, Block) and obj is not Block}
_EDGE_RE = re.compile(r"^\s*(\S+)\s*->\s*(\S+)\s*$")  # "src.out -> amp.in"
_PORT_REF_RE = re.compile(r"^(\w+)\.(\w+)$")
MAX_DEPTH = 100  # nesting of lists and mappings in a graph file (a graph needs fewer than 10)


def load_graph(path, domain: str | None = None) -> GraphSpec:
    """The graph spec of the graph file at ``path`` (run it with ``Runtime.from_spec``);
    ``domain`` overrides the file's ``domain:`` (default: the file name's stem)."""
    path = Path(path)
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        column = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        raise GraphFileError(str(path), line, None, f"not UTF-8 text: byte 0x{raw[e.start]:02x} at column "
                             f"{column} (a graph file is UTF-8 YAML)") from None
    directory = str(path.resolve().parent)
    if directory not in sys.path:
        sys.path.append(directory)
    return _Loader(str(path)).load(text, domain, fallback_domain=path.stem)


def load_graph_text(text: str, source: str = "<string>", domain: str | None = None) -> GraphSpec:
    """Like :func:`load_graph` for YAML text; ``source`` names it in errors
    (default domain: ``graph``)."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str of YAML, not {type(text).__name__}")
    return _Loader(source).load(text, domain, fallback_domain="graph")


class _TooDeepError(yaml.composer.ComposerError):
    """A document nested deeper than MAX_DEPTH."""


class _DepthLimitedLoader(yaml.SafeLoader):
    """The safe loader, refusing nesting deeper than MAX_DEPTH (composing recurses:
    a deeper document would end in RecursionError) at the line where it happens."""

    _depth = 0

    def compose_node(self, parent, index):
        if self._depth >= MAX_DEPTH:
            mark = self.peek_event().start_mark
            raise _TooDeepError(None, None, f"lists and mappings nested deeper than {MAX_DEPTH} levels", mark)
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _is_null(node) -> bool:
    return isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:null"


def _describe(node) -> str:
    if isinstance(node, yaml.MappingNode):
        return "a mapping"
    if isinstance(node, yaml.SequenceNode):
        return "a list"
    return "an empty value" if _is_null(node) else repr(node.value)


class _Loader:
    """One load: the source name (for errors), a YAML constructor, the spec it builds."""

    def __init__(self, source: str):
        self.source = source
        self.constructor = yaml.constructor.SafeConstructor()
        self.spec: GraphSpec | None = None

    # -- node helpers: each fails at the node's own line --------------------------------

    def fail(self, node, key: str | None, reason: str):
        raise GraphFileError(self.source, node.start_mark.line + 1, key, reason)

    def mapping(self, node, key: str | None, allowed=None) -> dict[str, tuple]:
        """{key text: (key node, value node)} of a mapping node; rejects unknown and
        duplicate keys (YAML itself would silently keep the last)."""
        if not isinstance(node, yaml.MappingNode):
            self.fail(node, key, f"expected a mapping, not {_describe(node)}")
        seen = set()
        for k, _ in node.value:
            if not isinstance(k, yaml.ScalarNode):
                self.fail(k, key, f"a key must be a plain name, not {_describe(k)}")
            if k.value in seen:
                self.fail(k, f"{key}.{k.value}" if key else k.value, "duplicate key")
            seen.add(k.value)
        try:
            self.constructor.flatten_mapping(node)  # "<<: *anchor" merges: its keys first, ours win
        except yaml.YAMLError as e:
            self.fail(node, key, str(getattr(e, "problem", None) or e))
        except RecursionError:  # merges of merges through aliases
            self.fail(node, key, "merge keys nested too deeply")
        items = {}
        for k, v in node.value:
            path = f"{key}.{k.value}" if key else k.value
            if allowed is not None and k.value not in allowed:
                self.fail(k, path, f"unknown key; {_hint(k.value, allowed)}allowed: {', '.join(allowed)}")
            items[k.value] = (k, v)
        return items

    def value(self, node, key: str):
        """The Python value of a node (PyYAML's safe types)."""
        try:
            return self.constructor.construct_object(node, deep=True)
        except yaml.YAMLError as e:
            self.fail(node, key, str(getattr(e, "problem", None) or e))
        except RecursionError:  # aliases can nest deeper than the file's own text
            self.fail(node, key, "the value is nested too deeply (through aliases)")
        except ValueError as e:  # int() of too many digits, a timestamp such as 2024-13-45
            if "integer string conversion" in str(e):
                self.fail(node, key, f"an integer of more than {sys.get_int_max_str_digits()} digits")
            self.fail(node, key, f"cannot read the value: {e}")

    def typed(self, node, key: str, kind, what: str):
        value = self.value(node, key)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            self.fail(node, key, f"expected {what}, not {_describe(node)}")
        return value

    def choice(self, node, key: str, choices: tuple):
        value = self.value(node, key)
        if not isinstance(value, str) or value not in choices:
            self.fail(node, key, f"expected {' or '.join(map(repr, choices))}, not {_describe(node)}")
        return value

    def power_of_two(self, node, key: str) -> int:
        value = self.typed(node, key, int, "a power of two")
        if value < 1 or value & (value - 1):
            self.fail(node, key, f"expected a power of two, not {value}")
        if value > MAX_CAPACITY:
            self.fail(node, key, f"expected a power of two up to 2**24, not {value}")
        return value

    # -- the file ------------------------------------------------------------------------

    def load(self, text: str, domain: str | None, fallback_domain: str) -> GraphSpec:
        if domain is not None:  # the caller's, not the file's: a plain ValueError
            check_domain(domain)
        try:
            root = yaml.compose(text, Loader=_DepthLimitedLoader)
        except RecursionError:  # MAX_DEPTH keeps well below the limit; this is a safety net
            raise GraphFileError(self.source, 1, None, "the document is nested too deeply") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            line = mark.line + 1 if mark else 1
            problem = getattr(e, "problem", None) or str(e)
            context = getattr(e, "context", None)
            reason = ("" if isinstance(e, _TooDeepError) else "YAML syntax error: ") + str(problem)
            reason += f" (column {mark.column + 1})" if mark else ""
            reason += f", {context}" if context else ""
            raise GraphFileError(self.source, line, None, reason) from None
        if root is None:
            raise GraphFileError(self.source, 1, None, "the file is empty; a graph needs 'blocks:'")
        if not isinstance(root, yaml.MappingNode):
            self.fail(root, None, f"the top level must be a mapping with 'blocks:', not {_describe(root)}")
        top = self.mapping(root, None, TOP_KEYS)
        if "blocks" not in top:
            self.fail(root, "blocks", "missing: a graph needs 'blocks:' (name -> {class: ...})")

        file_domain = None
        if "domain" in top:
            file_domain = self.typed(top["domain"][1], "domain", str, "a name")
            try:
                check_domain(file_domain)
            except ValueError as e:
                self.fail(top["domain"][1], "domain", str(e))
        elif domain is None:  # the fallback, the file's name, must make a domain name too
            try:
                check_domain(fallback_domain)
            except ValueError as e:
                self.fail(root, "domain", f"{e}; add 'domain:' (the default is the file's name)")
        domain = domain or file_domain or fallback_domain  # each checked above
        capacity = self.power_of_two(top["capacity"][1], "capacity") if "capacity" in top else 16
        pools = self.pools(top["pools"][1]) if "pools" in top else None
        try:
            self.spec = GraphSpec(domain, pools=pools, capacity=capacity)
        except (TypeError, ValueError) as e:  # checked above: not expected
            self.fail(root, None, str(e))
        if "hosts" in top:
            self.host_specs(top["hosts"][1])
        if "remote_control" in top:  # off unless the file says so: control from anywhere is opt-in
            self.spec.remote_control = self.typed(top["remote_control"][1], "remote_control", bool,
                                                  "true or false")

        block_nodes = self.mapping(top["blocks"][1], "blocks")
        if not block_nodes:
            self.fail(top["blocks"][1], "blocks", "no blocks")
        for name, (key_node, node) in block_nodes.items():
            self.block(name, key_node, node)
        if "connections" in top:
            self.connections(top["connections"][1])
        for port in self.spec.unconnected_inputs():  # start() would refuse them: say where
            self.fail(block_nodes[port.block][0], f"blocks.{port.block}",
                      f"input {port.port!r} is not connected; add e.g. 'OTHER.out -> {port}'")
        return self.spec

    def host_specs(self, node) -> None:
        """The hosts; their Zenoh settings are checked by multiqueue.net (check_hosts)."""
        hosts = self.spec.hosts
        for name, (key_node, value) in self.mapping(node, "hosts").items():
            key = f"hosts.{name}"
            if not re.fullmatch(r"[A-Za-z0-9_-]{1,32}", name):
                self.fail(key_node, key, "a host name is 1-32 letters, digits, _ or -")
            fields = self.mapping(value, key, HOST_KEYS) if not _is_null(value) else {}
            domain = f"{self.spec.domain}-{name}"
            if "domain" in fields:
                domain = self.typed(fields["domain"][1], f"{key}.domain", str, "a domain name")
            try:
                check_domain(domain)
            except ValueError as e:
                self.fail(fields["domain"][1] if "domain" in fields else key_node, f"{key}.domain", str(e))
            zenoh, origin = None, None
            if "zenoh" in fields:
                zenoh = self.value(fields["zenoh"][1], f"{key}.zenoh")
                if zenoh is not None and not isinstance(zenoh, dict):
                    self.fail(fields["zenoh"][1], f"{key}.zenoh", f"expected a mapping of Zenoh settings, "
                              f"not {_describe(fields['zenoh'][1])}")
                origin = (self.source, fields["zenoh"][1].start_mark.line + 1)
            hosts[name] = HostSpec(name, domain, zenoh, origin)
        if not hosts:
            self.fail(node, "hosts", "no hosts (leave 'hosts:' out to run on one machine)")

    def pools(self, node) -> ShmConfig:
        if not isinstance(node, yaml.SequenceNode) or not node.value:
            self.fail(node, "pools", "expected a list of pools such as "
                      "{name: frames, block_size: 65536, count: 64} (leave 'pools' out for the defaults)")
        pools = []
        for i, item in enumerate(node.value):
            key = f"pools[{i}]"
            fields = self.mapping(item, key, tuple(POOL_KEYS))
            for required in ("name", "block_size", "count"):
                if required not in fields:
                    self.fail(item, f"{key}.{required}", "missing")
            try:
                pools.append(PoolConfig(**{POOL_KEYS[k]: self.value(v, f"{key}.{k}")
                                           for k, (_, v) in fields.items()}))
            except (TypeError, ValueError) as e:
                self.fail(item, key, str(e))
        try:  # one metadata slot per block: make room for every block the pools can have
            return ShmConfig(pools=pools, max_buffers=max(16384, sum(p.block_limit for p in pools)))
        except ValueError as e:
            self.fail(node, "pools", str(e))

    # -- blocks --------------------------------------------------------------------------

    def block(self, name: str, key_node, node) -> None:
        key = f"blocks.{name}"
        fields = self.mapping(node, key, BLOCK_KEYS)
        if "class" not in fields:
            self.fail(node, f"{key}.class", "missing: give a built-in block's name or 'module:Class'")
        cls = self.block_class(fields["class"][1], f"{key}.class")
        block = self.construct(cls, key, node, fields["params"][1] if "params" in fields else None)
        options = {}
        if "placement" in fields:
            options["placement"] = self.typed(fields["placement"][1], f"{key}.placement", str,
                                              "'process', 'thread' or a process name")
            if not options["placement"]:
                self.fail(fields["placement"][1], f"{key}.placement", "must not be empty")
        if "restart" in fields:
            options["restart"] = self.choice(fields["restart"][1], f"{key}.restart", ("stop", "restart"))
        if "max_restarts" in fields:
            options["max_restarts"] = self.typed(fields["max_restarts"][1], f"{key}.max_restarts", int,
                                                 "a number of restarts")
            if options["max_restarts"] < 0:
                self.fail(fields["max_restarts"][1], f"{key}.max_restarts",
                          f"expected a number of restarts >= 0, not {options['max_restarts']}")
        hosts = self.spec.hosts
        if "host" in fields:
            if not hosts:
                self.fail(fields["host"][1], f"{key}.host", "no 'hosts:' section names the hosts")
            options["host"] = self.choice(fields["host"][1], f"{key}.host", tuple(hosts))
        elif hosts:
            options["host"] = next(iter(hosts))  # the first host is the default
        try:
            self.spec.add(block, name, **options)
        except (GraphError, TypeError, ValueError) as e:
            self.fail(key_node, key, str(e))

    def block_class(self, node, key: str) -> type:
        """A built-in's name, or ``module:Class`` / ``module.Class``: a Block subclass."""
        spec = self.typed(node, key, str, "a block class name")
        if ":" not in spec and "." not in spec:
            if spec not in BUILTINS:
                self.fail(node, key, f"unknown built-in block {spec!r}; {_hint(spec, BUILTINS)}"
                          f"built-ins: {', '.join(BUILTINS)} (or an import path 'module:Class')")
            return BUILTINS[spec]
        module, _, attribute = spec.partition(":") if ":" in spec else spec.rpartition(".")
        if not module or not attribute:
            self.fail(node, key, f"{spec!r}: an import path is 'module:Class' or 'module.Class'")
        try:
            obj = importlib.import_module(module)
        except ImportError as e:
            self.fail(node, key, f"cannot import module {module!r}: {e}")
        except Exception as e:  # noqa: BLE001 - the module's own code failed: say so, with where
            self.fail(node, key, f"importing module {module!r} raised {type(e).__name__}: {e}")
        for part in attribute.split("."):
            if not hasattr(obj, part):
                self.fail(node, key, f"module {module!r} has no attribute {attribute!r}")
            obj = getattr(obj, part)
        if not (isinstance(obj, type) and issubclass(obj, Block)):
            self.fail(node, key, f"{spec!r} is not a Block subclass (it is {_describe_object(obj)})")
        return obj

    def construct(self, cls: type, key: str, block_node, params_node) -> Block:
        """``cls(**params)``; a constructor's error points at the one parameter it
        names, if exactly one, else at ``params``."""
        key = f"{key}.params"
        params, key_nodes = {}, {}
        if params_node is not None and not _is_null(params_node):  # "params:" alone: none
            for k, (k_node, v_node) in self.mapping(params_node, key).items():
                params[k], key_nodes[k] = self.value(v_node, f"{key}.{k}"), k_node
        try:
            signature = inspect.signature(cls)
        except (TypeError, ValueError):  # some builtins have none: let the call say
            signature = None
        if signature is not None:
            named = {n: p for n, p in signature.parameters.items()
                     if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
            takes = f"{cls.__name__} takes {', '.join(named) or 'no parameters'}"
            if not any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values()):
                for k in params:
                    if k not in named:
                        self.fail(key_nodes[k], f"{key}.{k}", f"unknown parameter; {_hint(k, named)}{takes}")
            missing = [n for n, p in named.items() if p.default is p.empty and n not in params]
            if missing:
                self.fail(params_node or block_node, key, f"missing {', '.join(map(repr, missing))}; {takes}")
        try:
            block = cls(**params)
            block.check_parameters()  # a run-time parameter's declared type and range
            return block
        except Exception as e:  # noqa: BLE001 - any constructor failure is a bad parameter
            named = [k for k in params if re.search(rf"\b{re.escape(k)}\b", str(e))]
            if len(named) == 1:
                self.fail(key_nodes[named[0]], f"{key}.{named[0]}", str(e))
            self.fail(params_node or block_node, key, f"{cls.__name__}(...) raised {type(e).__name__}: {e}")

    # -- connections ---------------------------------------------------------------------

    def connections(self, node) -> None:
        if _is_null(node):  # "connections:" alone: none
            return
        if not isinstance(node, yaml.SequenceNode):
            self.fail(node, "connections", f"expected a list of 'src.out -> dst.in', not {_describe(node)}")
        for i, item in enumerate(node.value):
            key = f"connections[{i}]"
            options, fields = {}, {}
            if isinstance(item, yaml.ScalarNode):
                match = _EDGE_RE.match(str(self.value(item, key)))
                if not match:
                    self.fail(item, key, f"{item.value!r} is not 'block.port -> block.port'")
                src = self.port(item, key, match.group(1), "out")
                dst = self.port(item, key, match.group(2), "in")
            else:
                fields = self.mapping(item, key, EDGE_KEYS)
                for required in ("from", "to"):
                    if required not in fields:
                        self.fail(item, f"{key}.{required}", "missing")
                src, dst = (self.port(fields[k][1], f"{key}.{k}",
                                      self.typed(fields[k][1], f"{key}.{k}", str, "'block.port'"), d)
                            for k, d in (("from", "out"), ("to", "in")))
                if "policy" in fields:
                    options["policy"] = self.choice(fields["policy"][1], f"{key}.policy", tuple(POLICIES))
                if "capacity" in fields:
                    options["capacity"] = self.power_of_two(fields["capacity"][1], f"{key}.capacity")
            options["remote_key"] = self.remote_key(key, fields, src, dst)
            try:
                edge = self.spec.connect(src, dst, **options)
            except (GraphError, ValueError) as e:  # dtype or shape mismatch, second writer, cycle, hosts
                self.fail(item, key, str(e))
            key_node = fields["key"][1] if "key" in fields else item
            edge.origin = (self.source, key_node.start_mark.line + 1)

    def remote_key(self, key: str, fields: dict, src, dst) -> str | None:
        """The Zenoh key of a remote edge (checked by multiqueue.net), None for a local one."""
        remote = "remote" in fields and self.typed(fields["remote"][1], f"{key}.remote", bool,
                                                   "true or false")
        if "key" in fields and not remote:
            self.fail(fields["key"][1], f"{key}.key", "a key is for remote edges; add 'remote: true'")
        if not remote:
            return None
        if "key" in fields:
            return self.typed(fields["key"][1], f"{key}.key", str, "a Zenoh key such as 'lab/radio/iq'")
        return default_remote_key(self.spec.domain, src, dst)

    def port(self, node, key: str, text: str, direction: str):
        match = _PORT_REF_RE.fullmatch(text)
        if not match:
            self.fail(node, key, f"{text!r} is not 'block.port'")
        block, port = match.groups()
        if block not in self.spec.blocks:
            self.fail(node, key, f"{text!r}: no block named {block!r}; blocks: {', '.join(self.spec.blocks)}")
        handle = self.spec.blocks[block]
        ports = handle.outputs if direction == "out" else handle.inputs
        if port not in ports:
            kind = "output" if direction == "out" else "input"
            self.fail(node, key, f"{text!r}: block {block!r} ({type(handle.block).__name__}) has no {kind} "
                      f"port {port!r}; its {kind}s: {', '.join(ports) or 'none'}")
        return handle[port]


def _hint(word: str, choices) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f"did you mean {close[0]!r}? " if close else ""


def _describe_object(obj) -> str:
    return f"a class, {obj.__qualname__}" if isinstance(obj, type) else f"a {type(obj).__name__}"
