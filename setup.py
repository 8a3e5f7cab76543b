"""Package setup: reads settings.ini (nbdev 2 layout) without pkg_resources."""
from configparser import ConfigParser
import setuptools
from packaging.requirements import Requirement  # raises on a malformed requirement

cfg = ConfigParser(delimiters=['='])
cfg.read('settings.ini', encoding='utf-8')
cfg = cfg['DEFAULT']
licenses = {'apache2': ('Apache Software License 2.0', 'OSI Approved :: Apache Software License')}
lic = licenses[cfg['license']]


# The shipped assets: every file of data/ (and its folders) that the library or a lesson reads at run time, and the
# README that says how each was made (it carries the MNIST attribution); lesson plots (*.png) stay in the repository.
assets = cfg['lib_path'] + '.assets'
asset_pkgs = [assets] + [f'{assets}.{p}' for p in setuptools.find_namespace_packages('data', exclude=['*__pycache__*'])]


def reqs(key):
    out = cfg.get(key, '').split()
    for r in out: Requirement(r)
    return out


setuptools.setup(
    name=cfg['lib_name'].replace('_', '-'),
    version=cfg['version'],
    description=cfg['description'],
    long_description=open('README.md', encoding='utf-8').read(),
    long_description_content_type='text/markdown',
    author=cfg['author'], author_email=cfg['author_email'],
    license=lic[0],
    classifiers=['Programming Language :: Python :: 3', 'License :: ' + lic[1],
                 'Development Status :: 3 - Alpha', 'Intended Audience :: Developers'],
    keywords=cfg['keywords'],
    packages=setuptools.find_packages(include=[cfg['lib_path'], cfg['lib_path'] + '.*']) + asset_pkgs,
    package_dir={assets: 'data'},  # the top-level data/ folder is installed as the package folder dalle_course/assets/
    package_data={p: ['*.npz', '*.safetensors', '*.json', '*.md', '*.ref'] for p in asset_pkgs},
    include_package_data=True,
    python_requires='>=' + cfg['min_python'],
    install_requires=reqs('requirements'),
    extras_require={'dev': reqs('dev_requirements')},
    entry_points={'console_scripts': cfg.get('console_scripts').split(),
                  'nbdev': [f"{cfg['lib_path']}={cfg['lib_path']}._modidx:d"]},
    zip_safe=False,
)
