"""Publishing to the Hugging Face Hub: ``push`` uploads a finished folder with a model card.

It reads finished folders only (a result's ``deltamerge-result.json``, a delta's manifest), so
it imports no entry point. Fetching inputs from the Hub is a source: :mod:`deltamerge.sources.hub`.
"""

from .push import PushResult, push_to_hub

__all__ = ["PushResult", "push_to_hub"]
