#ifndef FORGE_YAML_MERGE_H
#define FORGE_YAML_MERGE_H
#include "yaml_io.h"
#endif
