"""The serving batch scheduler: concurrent requests share one decode batch, each gets what it would alone,
a full queue is refused, a cancelled request leaves the batch, a failing pass fails only its requests."""

from __future__ import annotations

import threading
import time

import pytest

from service.api.serving.generation import GenerationResult, SamplingParams
from service.api.serving.guard import GuardIndex
from service.api.serving.scheduler import BatchScheduler, Prompt, ServerBusy, SubmitCallbacks
from workers.engine.decoding import greedy_generate
from workers.engine.testing import sharp_tiny_model, tiny_tokenizer

GREEDY = SamplingParams(max_new_tokens=12, temperature=0)
NO_GUARD = GuardIndex.build(0, {})
PROMPTS = ["The capital of France is", "Hi", "Once upon a time there was a", "Numbers: 1 2 3"]


@pytest.fixture(scope="module")
def model():
    model = sharp_tiny_model()
    model.generation_config.eos_token_id = None  # every request runs its full length
    return model


@pytest.fixture
def batch_sizes(model):
    """Rows of every forward pass the model runs during the test."""
    sizes: list[int] = []
    handle = model.register_forward_pre_hook(lambda _m, _a, kw: sizes.append(kw["input_ids"].shape[0]),
                                             with_kwargs=True)
    yield sizes
    handle.remove()


class Waiter:
    """A request's callbacks with a blocking wait for its end."""

    def __init__(self, cancel_after: int | None = None) -> None:
        self.done = threading.Event()
        self.outcome: GenerationResult | BaseException | None = None
        self.deltas: list[tuple[int, str, str | None]] = []
        self.cancel_after = cancel_after
        self.callbacks = SubmitCallbacks(self._on_done, self._on_delta, self._cancelled)

    def _on_done(self, outcome) -> None:
        self.outcome = outcome
        self.done.set()

    def _on_delta(self, index: int, text: str, finish: str | None) -> None:
        self.deltas.append((index, text, finish))

    def _cancelled(self) -> bool:
        return self.cancel_after is not None and len(self.deltas) >= self.cancel_after

    def result(self) -> GenerationResult:
        assert self.done.wait(60), "the scheduler never finished the request"
        if isinstance(self.outcome, BaseException):
            raise self.outcome
        return self.outcome


def scheduler(model, lock=None, max_batch=16, max_queue=16) -> BatchScheduler:
    return BatchScheduler(model, tiny_tokenizer(), lock or threading.Lock(), max_batch=max_batch,
                          max_queue=max_queue)


def submit_together(sched: BatchScheduler, lock: threading.Lock, prompts, params=GREEDY) -> list[Waiter]:
    """Submit every prompt while the compute lock is held, so they are all waiting when decoding starts."""
    tok, waiters = tiny_tokenizer(), []
    with lock:
        for text in prompts:
            waiter = Waiter()
            sched.submit([Prompt(tok(text)["input_ids"])], params, NO_GUARD, waiter.callbacks)
            waiters.append(waiter)
    return waiters


def test_concurrent_requests_share_one_batch_and_each_gets_its_greedy_answer(model, batch_sizes):
    tok, lock = tiny_tokenizer(), threading.Lock()
    sched = scheduler(model, lock)
    waiters = submit_together(sched, lock, PROMPTS)
    results = [w.result() for w in waiters]
    assert max(batch_sizes) >= 3  # the first request prefilled alone, the other three joined together
    for text, result in zip(PROMPTS, results):
        expected = greedy_generate(model, [tok(text)["input_ids"]], GREEDY.max_new_tokens)[0]
        assert result.choices[0].text == tok.decode(expected, skip_special_tokens=True)
        assert result.completion_tokens == GREEDY.max_new_tokens


def test_the_batch_never_holds_more_than_max_batch_rows(model, batch_sizes):
    lock = threading.Lock()
    sched = scheduler(model, lock, max_batch=2)
    waiters = submit_together(sched, lock, PROMPTS)
    assert all(w.result().choices for w in waiters)
    assert max(batch_sizes) == 2


def test_a_full_queue_refuses_with_429_and_retry_after(model):
    lock = threading.Lock()
    sched = scheduler(model, lock, max_batch=1, max_queue=2)
    tok = tiny_tokenizer()
    with lock:  # the first request is admitted (then blocks on the lock), two wait, the fourth is refused
        waiters = submit_together(sched, threading.Lock(), PROMPTS[:1])
        while sched.waiting:
            time.sleep(0.01)
        waiters += submit_together(sched, threading.Lock(), PROMPTS[1:3])
        with pytest.raises(ServerBusy) as refused:
            sched.submit([Prompt(tok("one more")["input_ids"])], GREEDY, NO_GUARD, Waiter().callbacks)
    assert refused.value.status_code == 429 and refused.value.headers == {"Retry-After": "1"}
    assert all(w.result().choices for w in waiters)  # nothing queued before was lost


def test_a_cancelled_request_leaves_the_batch_and_the_others_finish(model):
    tok, lock = tiny_tokenizer(), threading.Lock()
    sched = scheduler(model, lock)
    quitter, stayer = Waiter(cancel_after=2), Waiter()
    with lock:
        sched.submit([Prompt(tok(PROMPTS[0])["input_ids"])], GREEDY, NO_GUARD, quitter.callbacks)
        sched.submit([Prompt(tok(PROMPTS[1])["input_ids"])], GREEDY, NO_GUARD, stayer.callbacks)
    assert quitter.result().completion_tokens < GREEDY.max_new_tokens
    assert stayer.result().completion_tokens == GREEDY.max_new_tokens


def test_n_choices_and_several_prompts_of_one_request_come_back_indexed(model):
    tok = tiny_tokenizer()
    sched, waiter = scheduler(model), Waiter()
    params = SamplingParams(max_new_tokens=6, temperature=0.8, n=2, seed=7)
    prompts = [Prompt(tok(PROMPTS[0])["input_ids"], "", 0), Prompt(tok(PROMPTS[1])["input_ids"], "", 2)]
    sched.submit(prompts, params, NO_GUARD, waiter.callbacks)
    result = waiter.result()
    assert [c.index for c in result.choices] == [0, 1, 2, 3]
    assert result.prompt_tokens == sum(len(p.ids) for p in prompts)
    again = Waiter()
    sched.submit(prompts, params, NO_GUARD, again.callbacks)
    assert [c.text for c in again.result().choices] == [c.text for c in result.choices]  # seeded


def test_a_failing_forward_pass_fails_its_requests_and_the_scheduler_keeps_serving(model):
    tok = tiny_tokenizer()
    sched, broken = scheduler(model), Waiter()
    handle = model.register_forward_pre_hook(lambda *_: (_ for _ in ()).throw(RuntimeError("device lost")))
    sched.submit([Prompt(tok(PROMPTS[0])["input_ids"])], GREEDY, NO_GUARD, broken.callbacks)
    with pytest.raises(RuntimeError, match="device lost"):
        broken.result()
    handle.remove()
    healthy = Waiter()
    sched.submit([Prompt(tok(PROMPTS[1])["input_ids"])], GREEDY, NO_GUARD, healthy.callbacks)
    assert healthy.result().completion_tokens == GREEDY.max_new_tokens
