"""Board-side commands: ``chat``, ``mock-model`` (and ``serve``, ``doctor``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from rkedge.runtime.options import library_options, llm_kwargs, resolve_library_choice, runtime_param_options
from rkedge.runtime.server.options import model_settings, server_limit_options, server_model_options


@click.command()
@click.argument("model", type=click.Path(path_type=Path))
@library_options
@runtime_param_options
@click.option("--system", default=None, help="System prompt.")
@click.option("--prompt", "prompts", multiple=True,
              help="Send this turn and print the reply, without the interactive prompt (repeatable).")
@click.option("--lora", "lora_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Load a converted LoRA adapter (<model>_lora.rkllm) and use it.")
def chat(model: Path, mock: bool, library: str | None, abi: str | None, max_context: int | None,
         max_new_tokens: int, temperature: float | None, top_k: int | None, top_p: float | None,
         base_domain_id: int | None, template: str | None, verbose: bool, system: str | None,
         prompts: tuple[str, ...], lora_path: Path | None) -> None:
    """Chat with MODEL in the terminal (streaming; Ctrl-C stops a reply, /exit leaves)."""
    from rkedge.runtime.chat_cli import run_chat

    run_chat(model, library=resolve_library_choice(mock, library), abi=abi, template=template, verbose=verbose,
             system=system, prompts=list(prompts), lora_path=lora_path,
             params=llm_kwargs(max_context, max_new_tokens, temperature, top_k, top_p, base_domain_id))


@click.command("mock-model")
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Where to write the simulated model.")
@click.option("--name", default="sim-model", show_default=True)
@click.option("--arch", "architecture", default="LlamaForCausalLM", show_default=True)
@click.option("--toolkit-version", default="1.3.0", show_default=True,
              help="The rkllm-toolkit version the model claims (runtimes of older generations refuse it: F-3).")
@click.option("--platform", default="rk3588", show_default=True)
@click.option("--dtype", default="w8a8", show_default=True)
@click.option("--max-context-limit", type=int, default=4096, show_default=True)
@click.option("--template", "chat_family", default=None, help="Chat template family (gemma, llama3, qwen2...).")
@click.option("--response", "responses", multiple=True,
              help="Scripted reply: TEXT, or MATCH=>TEXT to answer prompts containing MATCH (repeatable, first match wins).")
@click.option("--pace", default="unlimited", show_default=True,
              help="unlimited, board (RK3588 Qwen2.5-1.5B figures), or PREFILL_TPS,DECODE_TPS.")
@click.option("--fault", "faults", multiple=True,
              help="Fault injection KEY=VALUE: init=npu_malloc, npu_malloc_size=N, fixed_by_base_domain_id=1, "
                   "driver_version=0.9.6, error_after_tokens=N, stall_after_tokens=N, stall_ms=N.")
@click.option("--vocab-size", type=int, default=32000, show_default=True)
def mock_model(out: Path, name: str, architecture: str, toolkit_version: str, platform: str, dtype: str,
               max_context_limit: int, chat_family: str | None, responses: tuple[str, ...], pace: str,
               faults: tuple[str, ...], vocab_size: int) -> None:
    """Create a simulated model for the simulated NPU (for demos and your own CI).

    It holds no weights and carries rkedge's own header: the real runtime path refuses it.
    """
    from rkedge.runtime.simmodel import build_cli_manifest, write_simulated_model

    manifest = build_cli_manifest(name=name, architecture=architecture, toolkit_version=toolkit_version,
                                  platform=platform, dtype=dtype, max_context_limit=max_context_limit,
                                  chat_family=chat_family, responses=responses, pace=pace, faults=faults,
                                  vocab_size=vocab_size)
    write_simulated_model(out, manifest)
    click.echo(json.dumps({"written": str(out), "model_id": manifest["model_id"], "toolkit_version": toolkit_version,
                           "platform": platform, "dtype": dtype}))


@click.command()
@click.argument("models", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@library_options
@runtime_param_options
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (loopback by default).")
@click.option("--port", type=int, default=8080, show_default=True)
@click.option("--api-key", default=None, envvar="RKEDGE_API_KEY", help="Require this key (Bearer or x-api-key).")
@click.option("--max-queue", type=click.IntRange(0, 1000), default=8, show_default=True,
              help="Requests that may wait behind the running one; more get 429.")
@click.option("--name", "model_name", default=None, help="Model id clients use (default: from the manifest).")
@server_limit_options
@server_model_options
def serve(models: tuple[Path, ...], mock: bool, library: str | None, abi: str | None, max_context: int | None,
          max_new_tokens: int, temperature: float | None, top_k: int | None, top_p: float | None,
          base_domain_id: int | None, template: str | None, verbose: bool, host: str, port: int,
          api_key: str | None, max_queue: int, model_name: str | None, **limits: Any) -> None:
    """Serve MODELS (files, or folders of them) over an OpenAI- and Ollama-compatible HTTP API with a web chat
    page at /. Each request's model selects one; they share the NPU, loaded on demand."""
    from rkedge.runtime.server.run import run_server
    from rkedge.runtime.server.settings import ServerSettings

    chosen = {k: limits.pop(k) for k in ("max_loaded", "memory_budget_gb", "lora", "prompt_cache",
                                           "embeddings_any_model")}
    settings = ServerSettings(model_path=models[0], model_paths=models, **model_settings(**chosen),
                              library=resolve_library_choice(mock, library), abi=abi, model_name=model_name, api_key=api_key, max_queue=max_queue, host=host, port=port,
                              template=template, **limits,
                              llm_params=llm_kwargs(max_context, max_new_tokens, temperature, top_k, top_p,
                                                    base_domain_id))
    run_server(settings, verbose=verbose)


@click.command()
@click.option("--model", type=click.Path(path_type=Path), default=None,
              help="Also check this model against the board and runtime.")
@click.option("--root", type=click.Path(exists=True, file_okay=False, path_type=Path), default=Path("/"),
              show_default=True, help="Read the system below this folder (fixture roots for tests).")
@library_options
@click.option("--trial-init", is_flag=True, help="Initialise the model with a tiny context and read the runtime's log.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def doctor(model: Path | None, root: Path, mock: bool, library: str | None, abi: str | None, trial_init: bool,
           as_json: bool) -> None:
    """Check this board (SoC, RAM, NPU driver, runtime library, clocks) and optionally a model on it.

    Exit code 1 when a check fails.
    """
    from rkedge.runtime.doctor import run_doctor

    report = run_doctor(root, model=model, library=resolve_library_choice(mock, library), abi=abi,
                        trial_init=trial_init)
    click.echo(json.dumps(report.to_dict(), indent=1, default=str) if as_json else report.render())
    if report.verdict == "fail":
        raise SystemExit(1)


def register(group: click.Group) -> None:
    group.add_command(doctor)
    group.add_command(chat)
    group.add_command(mock_model)
    group.add_command(serve)
