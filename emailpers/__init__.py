"""emailpers: send-time email personalisation.

Recipients stream in, each one's live data is fetched from the campaign's REST
sources (retries, backoff, a short disk cache), and a personalised email is
rendered with static fallback blocks wherever live data is missing.
"""

__version__ = "0.1.0"
