"""Errors of the migration client: each names what went wrong and what to do."""

from __future__ import annotations

from guestagent.migrate import faq


class MigrateError(Exception):
    """A failure the user can act on. ``keyword`` is the guide's log keyword, if any."""

    def __init__(self, message: str, keyword: str | None = None, advice: str | None = None,
                 retryable: bool = False) -> None:
        super().__init__(message)
        self.keyword = keyword
        self.advice = advice if advice is not None else (faq.advice(keyword) if keyword else "")
        self.retryable = retryable

    def lines(self) -> list[str]:
        head = f"{self.keyword}: {self}" if self.keyword else str(self)
        return [head] + ([f"  what to do: {self.advice}"] if self.advice else [])


class ConfigInvalid(MigrateError):
    """user_config.json breaks rules; ``problems`` holds one line per violation."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__(f"user_config.json: {len(problems)} problem(s)")
        self.problems = problems

    def lines(self) -> list[str]:
        return list(self.problems)


class ApiError(MigrateError):
    """The cloud refused a call: its error code, message and request id."""

    def __init__(self, action: str, code: str, message: str, request_id: str = "",
                 status: int = 0) -> None:
        keyword = faq.keyword_for_code(code)
        retry = status >= 500 or code in {"Throttling", "ServiceUnavailable", "InternalError"}
        text = f"{action} refused: {code}: {message}" + (
            f" (RequestId {request_id})" if request_id else "")
        super().__init__(text, keyword=keyword, retryable=retry and keyword is None)
        self.code = code
        self.status = status
