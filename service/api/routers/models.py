"""GET /v1/models: the model this API process serves (OpenAI shape)."""

from __future__ import annotations

from fastapi import APIRouter, Request

from service.api.deps import InferenceDep
from service.api.openai_protocol import ModelCard, ModelList
from service.api.serving.endpoint import current_model

router = APIRouter(prefix="/v1", tags=["inference"])


@router.get("/models", response_model=ModelList)
def list_models(request: Request, principal: InferenceDep) -> ModelList:
    """One entry: the base model's name, which is the `model` to send. `active_version` (an extension) is
    the fused version it serves now; rollbacks and new versions swap it without changing the id."""
    _holder, served = current_model(request)
    card = ModelCard(id=served.name, created=int(served.loaded_at), active_version=served.version)
    return ModelList(data=[card])
