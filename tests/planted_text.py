"""Planted answers for the text lesson's exercises (20_text): the reference and plausible mistakes."""
import re
from collections import Counter


# ---- exercise 1: words by \b\w+\b, lower-cased
def words_right(text):
    return re.findall(r'\b\w+\b', text.lower())

def words_no_lower(text):  # forgets to lower-case
    return re.findall(r'\b\w+\b', text)

def words_split(text):  # splits on whitespace: punctuation stays attached
    return text.lower().split()

def words_letters_only(text):  # [a-z]+ drops digits, underscores and accented letters
    return re.findall(r'[a-z]+', text.lower())

def words_keep_empty(text):  # re.split on non-word characters keeps empty strings
    return re.split(r'\W+', text.lower())


# ---- exercise 2: adjacent pair counts weighted by word frequency
def pair_counts_right(word_freqs):
    out = Counter()
    for w, f in word_freqs.items():
        for a, b in zip(w, w[1:]): out[a, b] += f
    return dict(out)

def pair_counts_unweighted(word_freqs):  # counts each word once, ignoring its frequency
    out = Counter()
    for w in word_freqs:
        for a, b in zip(w, w[1:]): out[a, b] += 1
    return dict(out)

def pair_counts_once_per_word(word_freqs):  # a pair repeated inside a word counted once
    out = Counter()
    for w, f in word_freqs.items():
        for p in set(zip(w, w[1:])): out[p] += f
    return dict(out)

def pair_counts_off_by_one(word_freqs):  # misses the last pair of every word
    out = Counter()
    for w, f in word_freqs.items():
        for i in range(len(w) - 2): out[w[i], w[i + 1]] += f
    return dict(out)


# ---- exercise 3: apply one merge
def merge_pair_right(symbols, pair):
    out, i = [], 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == tuple(pair):
            out.append(symbols[i] + symbols[i + 1]); i += 2
        else:
            out.append(symbols[i]); i += 1
    return out

def merge_pair_first_only(symbols, pair):  # merges only the first occurrence
    for i in range(len(symbols) - 1):
        if (symbols[i], symbols[i + 1]) == tuple(pair): return symbols[:i] + [pair[0] + pair[1]] + symbols[i + 2:]
    return list(symbols)

def merge_pair_right_to_left(symbols, pair):  # scans from the right: ['a','a','a'] -> ['a','aa']
    out, i = [], len(symbols) - 1
    while i >= 0:
        if i >= 1 and (symbols[i - 1], symbols[i]) == tuple(pair): out.append(symbols[i - 1] + symbols[i]); i -= 2
        else: out.append(symbols[i]); i -= 1
    return out[::-1]

def merge_pair_string_replace(symbols, pair):  # joins and replaces: merges across symbol boundaries
    s = ' '.join(symbols).replace(f'{pair[0]} {pair[1]}', pair[0] + pair[1])
    return s.split(' ') if s else []

def merge_pair_in_place(symbols, pair):  # right answer, but destroys the caller's list
    i = 0
    while i < len(symbols) - 1:
        if (symbols[i], symbols[i + 1]) == tuple(pair): symbols[i:i + 2] = [symbols[i] + symbols[i + 1]]
        i += 1
    return symbols


PLANTED = {
    'check_words': (words_right, [words_no_lower, words_split, words_letters_only, words_keep_empty]),
    'check_pair_counts': (pair_counts_right, [pair_counts_unweighted, pair_counts_once_per_word, pair_counts_off_by_one]),
    'check_merge_pair': (merge_pair_right, [merge_pair_first_only, merge_pair_right_to_left, merge_pair_string_replace,
                                            merge_pair_in_place]),
}
