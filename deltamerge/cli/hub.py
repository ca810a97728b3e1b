"""Commands that reach the Hub: push.

The Hub is reached through huggingface_hub, so HF_ENDPOINT, HF_TOKEN (never printed) and HF_HOME
apply as they do for every Hugging Face tool; ``--token`` and ``--revision`` are spelled as
huggingface-cli spells them (``upload`` calls the message ``--commit-message``).
"""

from __future__ import annotations

import click

from .common import handle_errors, hub_setup, print_json, say


@click.command("push", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("folder", metavar="DIR")
@click.argument("repo_id", metavar="REPO_ID")
@click.option("--private", is_flag=True, help="Create the repo as private (if it does not exist yet).")
@click.option("--revision", metavar="BRANCH", default=None,
              help="Push to this branch, created from main if it is new (default: main).")
@click.option("--create-pr", is_flag=True,
              help="Open a pull request with the upload instead of committing to the branch.")
@click.option("--commit-message", "--message", "message", metavar="TEXT", default=None,
              help="The commit message.")
@click.option("--token", metavar="TOKEN", default=None,
              help="Hub token with write access (default: HF_TOKEN, or `hf auth login`'s).")
@click.option("--json", "as_json", is_flag=True, help="Print where the push went as JSON.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars and no summary.")
@handle_errors
def push_cmd(folder: str, repo_id: str, private: bool, revision: str | None, create_pr: bool,
             message: str | None, token: str | None, as_json: bool, quiet: bool) -> None:
    """Upload DIR (a delta or a rebuilt model) to the Hub repo REPO_ID, in one commit.

    The repo is created if needed. Unless DIR has a README.md, a model card is added to the
    commit (DIR itself is not changed): for a rebuilt model its base and deltas with their
    commits, its license and its model digest; for a delta, its base, its kind and how to apply
    it. Needs a token with write access in HF_TOKEN (or from `hf auth login`, or --token).

    An interrupted push is finished by running the same command again: files already uploaded
    are not sent again, and nothing is committed until every file is up.

    \b
    Examples:
      deltamerge push ./vicuna-7b-delta my-org/vicuna-7b-delta
      deltamerge push ./vicuna-7b my-org/vicuna-7b --revision v1.1 --create-pr
    """
    from ..hub.push import push_to_hub  # deferred so --help answers without loading huggingface_hub

    hub_setup(None, None, quiet)
    pushed = push_to_hub(folder, repo_id, private=private, revision=revision,
                         create_pr=create_pr, message=message, token=token)
    if as_json:
        print_json(pushed.to_json())
    elif not quiet:
        what = "opened a pull request" if create_pr else "pushed"
        say(f"{what}: {pushed.url} (commit {pushed.commit[:12]})")
