import json, glob, statistics as st
def rows(tree):
    out={}
    for p in sorted(glob.glob(f'benchmarks/results/redesign/{tree}-*/solvers.json')):
        for r in json.load(open(p))['rows']:
            k=(r['net'],r['config'])
            out.setdefault(k,{'b':[], 's':[], 'cpu':[]})
            out[k]['b'].append(r['bound']); out[k]['s']+= r['seconds'] or []; out[k]['cpu'] += r['cpu_seconds'] or []
    return out
b=rows('base'); m=rows('main')
print(f"{'net':32s} {'config':18s} {'bound base':>12s} {'bound new':>12s} {'s base':>8s} {'s new':>8s} {'new/base':>8s} {'cpu base':>8s} {'cpu new':>8s} {'cpu ratio':>8s}")
ratios=[]; cr=[]
for k in b:
    if k not in m: continue
    bb, mm = b[k], m[k]
    if not bb['s'] or not mm['s']: continue
    sb, sm = st.median(bb['s']), st.median(mm['s']); cb, cm = st.median(bb['cpu']), st.median(mm['cpu'])
    same = all(x==y for x,y in zip(bb['b'],mm['b']))
    ratios.append(sm/sb); cr.append(cm/cb)
    print(f"{k[0][:32]:32s} {k[1]:18s} {bb['b'][0] or 0:12.6f} {mm['b'][0] or 0:12.6f} {sb:8.2f} {sm:8.2f} {sm/sb:8.2f} {cb:8.2f} {cm:8.2f} {cm/cb:8.2f} {'' if same else 'BOUND DIFFERS'}")
print("median wall ratio new/base", st.median(ratios), "median cpu ratio", st.median(cr), "n", len(ratios))
