"""GET /v1/models: the model this API process serves (OpenAI shape)."""

from __future__ import annotations

from fastapi import APIRouter, Request

from service.deps import InferenceDep
from service.errors import Unavailable
from service.schemas import ModelCard, ModelList

router = APIRouter(prefix="/v1", tags=["inference"])


@router.get("/models", response_model=ModelList)
def list_models(request: Request, principal: InferenceDep) -> ModelList:
    """One entry: the base model's name, which is the `model` to send. `active_version` (an extension) is
    the fused version it serves now; rollbacks and new versions swap it without changing the id."""
    holder = getattr(request.app.state, "serving", None)
    if holder is None:
        raise Unavailable("this API process does not serve a model (start it with `unlearn serve`)")
    served = holder.current()
    if served is None:
        raise Unavailable("the model is loading; retry shortly", headers={"Retry-After": "2"},
                          code="model_loading")
    card = ModelCard(id=served.name, created=int(served.loaded_at), active_version=served.version)
    return ModelList(data=[card])
