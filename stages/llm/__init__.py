"""The LLM client package: transport (openai's typed API), retry (tenacity), cache, accounting, client."""
from stages.llm.accounting import Usage, read_usage, summary_line, write_usage
from stages.llm.cache import ResponseCache, cache_key
from stages.llm.client import LLMClient, resolve_api_key
from stages.llm.transport import ChatResult, EndpointRejected, LLMError, parse_retry_after

__all__ = ["ChatResult", "EndpointRejected", "LLMClient", "LLMError", "ResponseCache", "Usage", "cache_key",
           "parse_retry_after", "read_usage", "resolve_api_key", "summary_line", "write_usage"]
