"""The fixed probe set of the quality gate: varied, everyday texts of 1 to ~60 tokens.

Fixed so a gate score means the same thing on every replica and every release; varied (short
and long, punctuation, digits, non-ASCII) because low precision hurts long inputs and rare
tokens first.
"""

from __future__ import annotations

PROBE_TEXTS: tuple[str, ...] = (
    "hello",
    "A man is eating food.",
    "The quick brown fox jumps over the lazy dog.",
    "How do I reset my password if I no longer have access to my email?",
    "The invoice was paid twice; please refund the second charge of $129.99.",
    "Redis streams keep entries until they are trimmed.",
    "I loved this film: the acting was superb and the ending surprised me.",
    "Terrible service. The package arrived broken and nobody answered my calls.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "The meeting has been moved to Thursday at 3 pm in room 4B.",
    "Can you recommend a good vegetarian restaurant near the station?",
    "Der schnelle braune Fuchs springt über den faulen Hund.",
    "Le chat dort sur le canapé depuis ce matin.",
    "¿Dónde está la biblioteca más cercana?",
    "東京は日本の首都です。",
    "Error 503: the upstream service is unavailable, retry after 30 seconds.",
    "def add(a, b): return a + b",
    "SELECT name, count(*) FROM orders GROUP BY name ORDER BY 2 DESC;",
    "The patient reported mild headaches and fatigue over the last two weeks.",
    "Interest rates rose by a quarter point, the third increase this year.",
    "She scored twice in the second half and the team won the cup.",
    "Mix the flour and butter, then add the eggs one at a time.",
    "Is it going to rain tomorrow?",
    "Thanks!",
    "Our quarterly revenue grew 12% year over year, driven by subscriptions in Europe and "
    "strong demand for the enterprise plan, while costs stayed flat.",
    "The library lends books, films and music, and its reading room is open every day "
    "except Sunday, from nine in the morning until eight in the evening.",
    "Neural networks learn representations by adjusting weights to minimise a loss function "
    "over many examples, usually with stochastic gradient descent and its variants.",
    "Please do not reply to this automated message.",
    "1 2 3 4 5 6 7 8 9 10",
    "emoji 🙂 and symbols © ® ™ → ∑",
    "The river flooded the valley after three days of heavy rain, and the villagers moved "
    "their animals to the hills before the bridge was closed.",
    "What is the capital of Australia?",
)
