"""The terminal chat: a streaming REPL usable over SSH.

Ctrl-C while a reply streams aborts that generation on the NPU and returns to the prompt; Ctrl-C at the
prompt clears the line; Ctrl-D or ``/exit`` leaves. Input history persists between sessions.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, TextIO

from rkedge.errors import RkedgeError
from rkedge.runtime._proc import process_rss_mb
from rkedge.runtime.chat import ChatSession
from rkedge.runtime.llm import LLM, GenerationResult

HELP = """commands:
  /reset            forget the conversation (clears the KV cache)
  /system [TEXT]    set (or clear) the system prompt; resets the conversation
  /stats            TTFT, tokens/s, tokens and memory of the last reply; KV cache size
  /lora [NAME|PATH|off]  use a loaded adapter, load one from a file, or turn it off
  /image [PATH|clear]    attach an image to your next message (a vision-language model), list or drop them
  /help             this text
  /exit             leave (also Ctrl-D)"""


def history_file() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "rkedge" / "chat_history"


class ChatRepl:
    """Replies go to ``out`` (stdout, so they can be piped); errors to ``err`` (stderr)."""

    def __init__(self, llm: LLM, session: ChatSession, *, lora: str | None = None, out: TextIO | None = None,
                 err: TextIO | None = None) -> None:
        self.llm = llm
        self.session = session
        self.lora = lora
        self.loras: dict[str, str] = {lora: lora} if lora else {}
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self.last: GenerationResult | None = None
        self.pending_images: list[tuple[str, bytes]] = []  # (path, bytes) attached to the next message

    def write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()

    def error(self, exc: RkedgeError) -> None:
        self.err.write(f"error: {exc}\n")
        self.err.flush()

    def turn(self, text: str) -> GenerationResult | None:
        images = [data for _, data in self.pending_images] or None
        try:
            stream = self.session.send(text, lora=self.lora, images=images)
        except RkedgeError as exc:
            self.error(exc)
            return None
        self.pending_images = []  # sent: they are in the conversation now
        failure: RkedgeError | None = None
        try:
            for chunk in stream:
                self.write(chunk)
        except KeyboardInterrupt:
            stream.abort()
            stream.close()
            self.write(" [stopped]")
        except RkedgeError as exc:
            failure = exc
        finally:
            stream.close()
            self.write("\n")
        if failure is not None:
            self.error(failure)  # after the reply's line ends, so the two streams do not interleave mid-line
        if self.session.dropped_messages:
            self.err.write(f"(context full: the {self.session.dropped_messages} oldest messages were dropped; "
                           "the system prompt stays. /reset starts over)\n")
            self.err.flush()
        self.last = stream.result
        return self.last

    def command(self, line: str) -> bool:
        """Runs a /command; returns False when the REPL should end."""
        name, _, arg = line[1:].partition(" ")
        arg = arg.strip()
        if name in ("exit", "quit", "q"):
            return False
        if name == "reset":
            self.session.reset()
            self.write("(conversation cleared)\n")
        elif name == "system":
            try:
                self.session.set_system(arg or None)
                self.write("(system prompt set; conversation cleared)\n" if arg else "(system prompt cleared)\n")
            except RkedgeError as exc:
                self.error(exc)
        elif name == "stats":
            self.write(self.stats_text() + "\n")
        elif name == "lora":
            self.lora_command(arg)
        elif name == "image":
            self.image_command(arg)
        elif name == "help":
            self.write(HELP + "\n")
        else:
            self.write(f"unknown command /{name}; /help lists them\n")
        return True

    def lora_command(self, arg: str) -> None:
        if not arg:
            self.write(f"adapter: {self.lora or 'none'}; loaded: {', '.join(self.loras) or 'none'}\n")
        elif arg == "off":
            self.lora = None
            self.write("(adapter off)\n")
        elif arg in self.loras:
            self.lora = arg
            self.write(f"(adapter {arg})\n")
        else:
            try:
                name = self.llm.load_lora(arg)
            except RkedgeError as exc:
                self.error(exc)
                return
            self.loras[name] = arg
            self.lora = name
            self.write(f"(adapter {name} loaded and in use)\n")

    def image_command(self, arg: str) -> None:
        from rkedge.runtime.vision.sources import from_path

        if not arg:
            names = ", ".join(path for path, _ in self.pending_images)
            self.write(f"images for the next message: {names or 'none'}\n")
            return
        if arg == "clear":
            self.pending_images = []
            self.write("(images dropped)\n")
            return
        if self.llm.vision is None:
            self.err.write(f"error: {self.llm.model_path.name} has no vision encoder, so it cannot take images "
                           "(fix: chat with the VLM folder rkedge convert wrote)\n")
            self.err.flush()
            return
        try:
            data = from_path(arg)
        except RkedgeError as exc:
            self.error(exc)
            return
        self.pending_images.append((arg, data))
        count = len(self.pending_images)
        self.write(f"(image {arg} attached; {count} image{'s' if count > 1 else ''} go with your next message)\n")

    def stats_text(self) -> str:
        parts = []
        if self.last is not None:
            s = self.last.stats
            if s.ttft_ms is not None:
                parts.append(f"TTFT {s.ttft_ms:.0f} ms")
            if s.tokens_per_s is not None:
                parts.append(f"{s.tokens_per_s:.1f} tokens/s")
            parts.append(f"{s.completion_tokens} tokens")
            if s.prompt_tokens is not None:
                parts.append(f"prompt {s.prompt_tokens} tokens")
            if s.memory_mb is not None:
                parts.append(f"runtime memory {s.memory_mb:.0f} MB")
        else:
            parts.append("no reply yet")
        kv = self.llm.kv_cache_size()
        if kv is not None:
            parts.append(f"KV cache {kv}/{self.llm.max_context_len} tokens")
        rss = process_rss_mb()
        if rss is not None:
            parts.append(f"process RSS {rss:.0f} MB")
        return ", ".join(parts)

    def loop(self, stdin: TextIO = sys.stdin) -> None:
        interactive = stdin.isatty()
        if interactive:
            _enable_history()
            info = self.llm.info()
            self.write(f"rkedge chat: {info['model']} on {'the simulated NPU' if info['simulated'] else info['library']}"
                       f" (ABI {info['abi']}). /help for commands, Ctrl-C stops a reply, /exit leaves.\n")
        while True:
            try:
                line = input(">>> ") if interactive else stdin.readline()
            except KeyboardInterrupt:
                self.write("\n(use /exit or Ctrl-D to leave)\n")
                continue
            except EOFError:
                self.write("\n")
                break
            if not interactive and line == "":
                break
            line = line.strip()
            if not line:
                continue
            if line.startswith("/"):
                if not self.command(line):
                    break
                continue
            self.turn(line)
        if interactive:
            _save_history()


def run_chat(model: Path, *, library: str | None, abi: str | None, template: str | None, verbose: bool,
             system: str | None, prompts: list[str], lora_path: Path | None, params: dict[str, Any]) -> None:
    with LLM(model, library=library, abi=abi, chat_template=template, verbose=verbose, **params) as llm:
        lora = llm.load_lora(lora_path) if lora_path else None
        # A terminal conversation goes on when the context fills: the oldest turns make room (the REPL says so).
        repl = ChatRepl(llm, llm.chat_session(system, context_policy="drop_oldest"), lora=lora)
        if prompts:
            for prompt in prompts:
                repl.turn(prompt)
            return
        repl.loop()


def _enable_history() -> None:
    try:
        import readline
    except ImportError:
        return
    path = history_file()
    try:
        readline.read_history_file(path)
    except OSError:
        pass
    readline.set_history_length(1000)


def _save_history() -> None:
    try:
        import readline
    except ImportError:
        return
    path = history_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        readline.write_history_file(path)
    except OSError:
        pass
