"""Adaptive Cache Governor (ACG) prompt-stability learner, pure (no Redis, no Celery).

Modules, one concept each:
- `canonical`: RFC 8785, serde_json text, Rust whitespace normalization, digests;
- `content`: message content as the runtime's codec types re-serialize it;
- `tools`: tool definitions (canonical text, schema hashes, fingerprint), cached;
- `ir`: PromptIR observation from a recorded `annotated_request`;
- `key`: the 0.10.x learning key;
- `stability`: analysis of an observation window;
- `learner`: the fold over run records.
"""

from worker.engine.acg.ir import build_prompt_ir
from worker.engine.acg.key import learning_key
from worker.engine.acg.learner import AcgFoldResult, fold_acg, run_learning_keys
from worker.engine.acg.stability import analyze

__all__ = [
    "AcgFoldResult",
    "analyze",
    "build_prompt_ir",
    "fold_acg",
    "learning_key",
    "run_learning_keys",
]
