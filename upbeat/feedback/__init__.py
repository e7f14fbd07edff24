"""Human feedback: a rating page for pairs of the champion's continuations, and its votes.

- `store`: the SQL database of raters, pairs, what each rater was shown, and votes;
- `app`: the rating page (Starlette, server-rendered, `upbeat feedback serve`);
- `pairs`: pairs generated in batch from the champion, and which of them to show;
- `snapshot`: the votes export DVC hashes, and the TRL preference pairs (`prompt` / `chosen` /
  `rejected`) the `feedback` stage makes of it;
- `client`, `simulate`: a rater as a program, through the page's own endpoints.
"""
