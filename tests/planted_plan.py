"Planted answers for the lesson-34 check: the right one, and the mistakes a learner makes (with the hint each must get)."


def _state(t): k = t['peak_kinds']; return k.get('param', 0) + k.get('grad', 0) + k.get('opt', 0)
def mem_right(t, how, n):
    if how == 'single': return t['peak_bytes']
    if how == 'ddp': return t['peak_bytes'] + t['param_bytes']
    return t['peak_bytes'] - _state(t) * (1 - 1 / n) + t['gathered_bytes']
def mem_no_buckets(t, how, n): return mem_right(t, how, n) - (t['param_bytes'] if how == 'ddp' else 0)
def mem_shards_all(t, how, n):                                            # shards the activations too
    return t['peak_bytes'] / n + t['gathered_bytes'] if how == 'fsdp' else mem_right(t, how, n)
def mem_no_gather(t, how, n): return mem_right(t, how, n) - (t['gathered_bytes'] if how == 'fsdp' else 0)
def mem_full_state(t, how, n):                                            # 4 P instead of what the peak holds
    return t['peak_bytes'] - 4 * t['param_bytes'] * (1 - 1 / n) + t['gathered_bytes'] if how == 'fsdp' else mem_right(t, how, n)
def mem_ddp_shards(t, how, n):                                            # DDP shards nothing
    return t['peak_bytes'] - _state(t) * (1 - 1 / n) if how == 'ddp' else mem_right(t, how, n)
def mem_mutates(t, how, n):
    t['peak_kinds'].pop('temp', None); return mem_right(t, how, n)
def mem_gib(t, how, n): return mem_right(t, how, n) / 2 ** 30            # GiB, not bytes


PLANTED = {
    'check_memory_per_gpu': (mem_right, [(mem_no_buckets, 'flat copy'), (mem_shards_all, 'not sharded'),
                                         (mem_no_gather, 'gathered_bytes'), (mem_full_state, "not 4 x param_bytes"),
                                         mem_ddp_shards, mem_mutates, (mem_gib, 'not GiB')]),
}
