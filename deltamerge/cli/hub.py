"""Commands that reach the Hub: push.

The Hub is reached through huggingface_hub, so HF_ENDPOINT, HF_TOKEN (never printed) and HF_HOME
apply as they do for every Hugging Face tool.
"""

from __future__ import annotations

import click

from .common import handle_errors


@click.command("push", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("folder", metavar="DIR")
@click.argument("repo_id", metavar="REPO_ID")
@click.option("--private", is_flag=True, help="Create the repo as private (if it does not exist yet).")
@click.option("--revision", metavar="BRANCH", default=None,
              help="Push to this branch, created from main if it is new (default: main).")
@click.option("--create-pr", is_flag=True,
              help="Open a pull request with the upload instead of committing to the branch.")
@click.option("-m", "--message", metavar="TEXT", default=None, help="The commit message.")
@handle_errors
def push_cmd(folder: str, repo_id: str, private: bool, revision: str | None, create_pr: bool,
             message: str | None) -> None:
    """Upload DIR (a delta or a rebuilt model) to the Hub repo REPO_ID, in one commit.

    The repo is created if needed. Unless DIR has a README.md, a model card is added to the
    commit (DIR itself is not changed): for a rebuilt model its base and deltas with their
    commits, its license and its model digest; for a delta, its kind and how to apply it.
    Needs a token with write access in HF_TOKEN (or from `hf auth login`).

    \b
    Examples:
      deltamerge push ./vicuna-7b-delta my-org/vicuna-7b-delta
      deltamerge push ./vicuna-7b my-org/vicuna-7b --revision v1.1 --create-pr
    """
    from ..hub.push import push_to_hub  # deferred so --help answers without loading huggingface_hub

    pushed = push_to_hub(folder, repo_id, private=private, revision=revision,
                         create_pr=create_pr, message=message)
    what = "opened a pull request" if create_pr else "pushed"
    click.echo(f"{what}: {pushed.url} (commit {pushed.commit[:12]})")
