def sentiment(prompts, completions, label, **columns):
    words = [c.strip().split()[0].strip(".,!").lower() if c.strip() else "" for c in completions]
    return [1.0 if w == ("positive" if y == 1 else "negative") else 0.0 for w, y in zip(words, label)]
