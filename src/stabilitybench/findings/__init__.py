"""The paper's claims judged from the typed summary and evaluation (`claims`), their tables
(`printing`), and the findings folder a reader opens offline (`export`)."""
