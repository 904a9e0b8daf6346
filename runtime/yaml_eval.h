#ifndef FORGE_YAML_EVAL_H
#define FORGE_YAML_EVAL_H
#include "yaml_merge.h"
static int merge_main(yctx *c, int docs, int opts)
{
    (void)docs; (void)opts; (void)seq_insert; (void)map_gets; (void)is_scalar; (void)is_str; (void)nstrz; (void)buf_adds; (void)map_remove; (void)seq_remove;
    yerr_add(c, "yaml.merge", NULL, NULL, NULL, "not implemented yet");
    yraise(c);
}
#endif
